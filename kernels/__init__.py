"""Fused kernels of sid_fast and their registry (installed as `sid_fast.kernels`).

Ops (DESIGN.md §3): `cfg_sid_generator_loss` and `cfg_fake_score_loss`, each with the PyTorch reference of
`sid_fast.losses` (backend `torch`), a Triton kernel (`triton`) and a C++/OpenMP extension (`cpp`, built from
csrc/ on first use). See docs/kernels.md.
"""

from sid_fast.kernels.ops import cfg_fake_score_loss, cfg_sid_generator_loss
from sid_fast.kernels.registry import (
    REFERENCE,
    backends,
    call,
    get_op,
    ops,
    register_kernel,
    register_op,
    set_backend,
    unregister_kernel,
)

__all__ = [
    "REFERENCE",
    "backends",
    "call",
    "cfg_fake_score_loss",
    "cfg_sid_generator_loss",
    "get_op",
    "ops",
    "register_kernel",
    "register_op",
    "set_backend",
    "unregister_kernel",
]
