"""The fused SiD loss ops (DESIGN.md §3, §4) and their built-in backends.

The references are `sid_fast.losses.cfg_sid_generator_loss` / `cfg_fake_score_loss`. Kernel modules are imported
on first use only: Triton decides at decoration time whether it runs interpreted (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import os

from torch import Tensor

from sid_fast import losses
from sid_fast.kernels.registry import call, register_kernel, register_op

register_op("cfg_sid_generator_loss", losses.cfg_sid_generator_loss)
register_op("cfg_fake_score_loss", losses.cfg_fake_score_loss)
LOSS_OPS = ("cfg_sid_generator_loss", "cfg_fake_score_loss")


def _lazy(module: str, attribute: str):
    def run(*args):
        return getattr(importlib.import_module(module), attribute)(*args)

    run.__name__ = f"{module}.{attribute}"
    return run


def elementwise_reason(big: list[Tensor], per_sample: list[Tensor], devices: tuple[str, ...]) -> str | None:
    """Eligibility shared by the fused losses: same-shape float tensors (B, ...), per-sample (B,) vectors."""
    import torch

    first = big[0]
    if first.device.type not in devices:
        return f"device {first.device.type} not in {devices}"
    if first.ndim < 2 or first.shape[0] == 0 or first[0].numel() == 0:
        return f"needs a non-empty batch (B, ...) of at least 2 dims, got {tuple(first.shape)}"
    for tensor in big:
        if tensor.shape != first.shape or tensor.device != first.device:
            return f"all latent tensors must share shape and device, got {tuple(tensor.shape)} vs {tuple(first.shape)}"
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {tensor.dtype} not supported"
    for tensor in per_sample:
        if tensor.shape != (first.shape[0],) or tensor.device != first.device:
            return f"per-sample tensors must be ({first.shape[0]},) on {first.device}, got {tuple(tensor.shape)}"
        if not tensor.is_floating_point():
            return f"per-sample tensor dtype {tensor.dtype} is not floating point"
    return None


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _generator_reason(devices_fn):
    def reason(x_t, t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond, teacher_scale, fake_scale,
               weight, alpha, scale):
        return elementwise_reason([x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond], [t, weight],
                                  devices_fn())
    return reason


def _fake_reason(devices_fn):
    def reason(velocity_uncond, velocity_cond, scale, x_g, noise):
        return elementwise_reason([velocity_uncond, velocity_cond, x_g, noise], [], devices_fn())
    return reason


def _cpp_devices() -> tuple[str, ...]:
    from sid_fast.kernels import cpp

    return cpp.devices()


register_kernel("cfg_sid_generator_loss", "triton", _lazy("sid_fast.kernels.sid_generator_loss", "forward"),
                _lazy("sid_fast.kernels.sid_generator_loss", "backward"), _generator_reason(_triton_devices))
register_kernel("cfg_fake_score_loss", "triton", _lazy("sid_fast.kernels.fake_score_loss", "forward"),
                _lazy("sid_fast.kernels.fake_score_loss", "backward"), _fake_reason(_triton_devices))
register_kernel("cfg_sid_generator_loss", "cpp", _lazy("sid_fast.kernels.cpp", "generator_forward"),
                _lazy("sid_fast.kernels.cpp", "generator_backward"), _generator_reason(_cpp_devices))
register_kernel("cfg_fake_score_loss", "cpp", _lazy("sid_fast.kernels.cpp", "fake_forward"),
                _lazy("sid_fast.kernels.cpp", "fake_backward"), _fake_reason(_cpp_devices))


# §3 generator loss with both CFG combinations (κ4 teacher, κ2 fake score), per sample (B,) fp32
def cfg_sid_generator_loss(x_t: Tensor, t: Tensor, x_g: Tensor, teacher_uncond: Tensor, teacher_cond: Tensor,
                           fake_uncond: Tensor, fake_cond: Tensor, teacher_scale: float, fake_scale: float,
                           weight: Tensor, alpha: float = 1.0, scale: float = 100.0, *,
                           backend: str | None = None) -> Tensor:
    """Latents (B, ...) of one shape; t, weight (B,). Returns the per-sample loss (B,) in fp32."""
    return call("cfg_sid_generator_loss", x_t, t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond,
                teacher_scale, fake_scale, weight, alpha, scale, backend=backend)


# §3 fake-score loss on CFG_κ1: sum_elements (v_u + κ1 (v_c - v_u) - (ε - x_g))^2, per sample (B,) fp32
def cfg_fake_score_loss(velocity_uncond: Tensor, velocity_cond: Tensor, scale: float, x_g: Tensor, noise: Tensor, *,
                        backend: str | None = None) -> Tensor:
    """All tensors (B, ...) of one shape. Returns the per-sample loss (B,) in fp32."""
    return call("cfg_fake_score_loss", velocity_uncond, velocity_cond, scale, x_g, noise, backend=backend)


# §4 CFG_κ as the pair the fused ops combine: (v(∅), v(c), κ) from one batched forward, or (v, v, 1) when the
# combination is trivial (κ ∈ {0, 1}) or the model guides itself (FLUX's guidance embedding)
def guided_velocity_split(model, x_t: Tensor, t: Tensor, cond, uncond, scale: float) -> tuple[Tensor, Tensor, float]:
    """(velocity_uncond, velocity_cond, scale) with u + scale (c − u) equal to `guided_velocity(...)`."""
    from sid_fast.guidance import guided_velocity, guided_velocity_pair

    if getattr(model, "guided_velocity", None) is None and scale not in (0.0, 1.0):
        velocity_uncond, velocity_cond = guided_velocity_pair(model, x_t, t, cond, uncond)
        return velocity_uncond, velocity_cond, scale
    velocity = guided_velocity(model, x_t, t, cond, uncond, scale)
    return velocity, velocity, 1.0


def check_loss_backend(backend: str) -> None:
    """Raise a ValueError naming `kernels.loss_backend` when no op knows `backend`."""
    from sid_fast.kernels.registry import backends

    for name in LOSS_OPS:
        if backend not in backends(name):
            raise ValueError(f"config field kernels.loss_backend: op {name} has no backend {backend!r}; "
                             f"registered: {backends(name)}")
