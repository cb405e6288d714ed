"""Fused kernels of sid_fast and their registry (installed as `sid_fast.kernels`).

Ops (DESIGN.md §3): `cfg_sid_generator_loss` and `cfg_fake_score_loss`, each with the PyTorch reference of
`sid_fast.losses` (backend `torch`), a Triton kernel (`triton`) and a C++/OpenMP extension (`cpp`, built from
csrc/ on first use). DiT block ops (block_ops.py): `adaln_modulation`, `gated_residual`, `rms_norm`,
`weighted_rms_norm`, `rotary_qk`, each with its reference and a Triton kernel; `install_block_kernels` switches
the matching modules of a diffusers transformer to them. See docs/kernels.md.
"""

from sid_fast.kernels.block_ops import adaln_modulation, gated_residual, rms_norm, rotary_qk
from sid_fast.kernels.blocks import BlockKernelReport, install_block_kernels, uninstall_block_kernels
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
    "BlockKernelReport",
    "adaln_modulation",
    "backends",
    "call",
    "cfg_fake_score_loss",
    "cfg_sid_generator_loss",
    "gated_residual",
    "get_op",
    "install_block_kernels",
    "ops",
    "register_kernel",
    "register_op",
    "rms_norm",
    "rotary_qk",
    "set_backend",
    "uninstall_block_kernels",
    "unregister_kernel",
]
