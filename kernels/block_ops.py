"""DiT block ops (issue 5, part 3): adaptive-norm modulation, gated residual, RMSNorm with and without weight, and
FLUX's interleaved rotary embedding applied to q and k at once.

The references below are the specification: each repeats, operation for operation, what the diffusers 0.42 modules
compute (so installing them with the `torch` backend changes no bit), and the Triton kernels in
triton_adaln_modulation.py, triton_gated_residual.py, triton_rms_norm.py and triton_rotary.py are checked against
them. The modules of a
diffusers model are switched to these ops by `install_block_kernels` (kernels/blocks.py).
Kernel modules are imported on first use only: Triton decides at decoration time whether it runs interpreted.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sid_fast.kernels.ops import _lazy
from sid_fast.kernels.registry import call, register_kernel, register_op

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- references (the specification)


# adaLN (DiT, Peebles & Xie 2023, §3.2): LayerNorm without affine, then x̂ (1 + scale) + shift per sample
# (AdaLayerNormZero / AdaLayerNormZeroSingle / AdaLayerNormContinuous / SD35AdaLayerNormZeroX / SanaModulatedNorm)
def adaln_modulation_ref(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """x (B, N, D); scale, shift (B, D) broadcast over the N tokens. Returns (B, N, D)."""
    return F.layer_norm(x, (x.shape[-1],), None, None, eps) * (1 + scale[:, None]) + shift[:, None]


# adaLN-zero gated residual: x + gate · branch, the gate per sample (written inline in diffusers' block forwards)
def gated_residual_ref(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """x, branch (B, N, D); gate (B, D). Returns (B, N, D)."""
    return x + gate[:, None] * branch


# RMSNorm (Zhang & Sennrich 2019, eq. 4) as diffusers.models.normalization.RMSNorm computes it: the mean square in
# fp32, x · rsqrt(ms + eps) in fp32, rounded to a half-precision weight's dtype before the weight multiplies
def weighted_rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., D); weight (D,). Returns (..., D) in weight's dtype if it is fp16/bf16, else in fp32."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    normed = x * torch.rsqrt(variance + eps)
    if weight.dtype in HALF_DTYPES:
        normed = normed.to(weight.dtype)
    return normed * weight


def rms_norm_ref(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without weight (diffusers' `elementwise_affine=False`): x (..., D) -> (..., D) in x's dtype."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype)


# RoPE (Su et al. 2021, eq. 34) on interleaved pairs (x_2i, x_2i+1), as diffusers' apply_rotary_emb with
# use_real=True, use_real_unbind_dim=-1, sequence_dim=1 (FLUX): out = x cos + rot(x) sin, rot(x)_2i = −x_2i+1,
# rot(x)_2i+1 = x_2i, in fp32 and rounded to x's dtype
def _rotate_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, D)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, S, H, D/2) each
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)  # (B, S, H, D)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def rotary_qk_ref(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """query, key (B, S, H, D) with D even; cos, sin (S, D). Returns the rotated pair stacked: (2, B, S, H, D)."""
    return torch.stack([_rotate_interleaved(query, cos, sin), _rotate_interleaved(key, cos, sin)])


# ---------------------------------------------------------------- fakes (output shape, dtype, device)


def _like_first(x, *_args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _weighted_rms_norm_fake(x, weight, _eps):
    dtype = weight.dtype if weight.dtype in HALF_DTYPES else torch.promote_types(torch.float32, weight.dtype)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _rotary_qk_fake(query, _key, _cos, _sin):
    return torch.empty((2, *query.shape), dtype=query.dtype, device=query.device)


register_op("adaln_modulation", adaln_modulation_ref, fake=_like_first)
register_op("gated_residual", gated_residual_ref, fake=_like_first)
register_op("rms_norm", rms_norm_ref, fake=_like_first)
register_op("weighted_rms_norm", weighted_rms_norm_ref, fake=_weighted_rms_norm_fake)
register_op("rotary_qk", rotary_qk_ref, fake=_rotary_qk_fake)

BLOCK_OP_NAMES = ("adaln_modulation", "gated_residual", "rms_norm", "weighted_rms_norm", "rotary_qk")


# ---------------------------------------------------------------- eligibility of the Triton kernels


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _common_reason(tensors: list[Tensor], same_dtype: bool = True) -> str | None:
    first = tensors[0]
    if first.device.type not in _triton_devices():
        return f"device {first.device.type} not in {_triton_devices()}"
    for tensor in tensors:
        if tensor.device != first.device:
            return f"tensors on {tensor.device} and {first.device}"
        if tensor.dtype not in KERNEL_DTYPES:
            return f"dtype {tensor.dtype} not supported"
        if same_dtype and tensor.dtype != first.dtype:
            return f"mixed dtypes {tensor.dtype} and {first.dtype}"
    if first.numel() == 0:
        return "empty input"
    return None


def _modulation_reason(x, per_sample_a, per_sample_b) -> str | None:
    if x.ndim != 3 or per_sample_a.shape != (x.shape[0], x.shape[2]) or per_sample_b.shape != per_sample_a.shape:
        return f"needs x (B, N, D) and per-sample (B, D) tensors, got {tuple(x.shape)}, {tuple(per_sample_a.shape)}"
    return _common_reason([x, per_sample_a, per_sample_b])


def _adaln_reason(x, scale, shift, eps):
    return _modulation_reason(x, scale, shift)


def _gated_reason(x, gate, branch):
    if branch.shape != x.shape:
        return f"x {tuple(x.shape)} and branch {tuple(branch.shape)} differ"
    return _modulation_reason(x, gate, gate) or _common_reason([x, gate, branch])


def _rms_reason(x, eps):
    return _common_reason([x]) if x.ndim >= 1 else "needs at least one dimension"


def _weighted_rms_reason(x, weight, eps):
    if weight.shape != x.shape[-1:]:
        return f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}"
    return _common_reason([x, weight], same_dtype=False)


def _rotary_reason(query, key, cos, sin):
    if query.ndim != 4 or key.shape != query.shape or query.shape[-1] % 2:
        return f"needs query and key (B, S, H, D) of one shape with D even, got {tuple(query.shape)}, {tuple(key.shape)}"
    if cos.shape != (query.shape[1], query.shape[3]) or sin.shape != cos.shape:
        return f"cos/sin must be (S, D) = {(query.shape[1], query.shape[3])}, got {tuple(cos.shape)}"
    return _common_reason([query, key]) or _common_reason([query, cos, sin], same_dtype=False)


for _op, _module, _reason in (("adaln_modulation", "adaln_modulation", _adaln_reason),
                              ("gated_residual", "gated_residual", _gated_reason),
                              ("rms_norm", "rms_norm", _rms_reason),
                              ("weighted_rms_norm", "rms_norm", _weighted_rms_reason),
                              ("rotary_qk", "rotary", _rotary_reason)):
    _forward = "forward" if _op != "weighted_rms_norm" else "weighted_forward"
    _backward = "backward" if _op != "weighted_rms_norm" else "weighted_backward"
    register_kernel(_op, "triton", _lazy(f"sid_fast.kernels.triton_{_module}", _forward),
                    _lazy(f"sid_fast.kernels.triton_{_module}", _backward), _reason)


# ---------------------------------------------------------------- functional API


def adaln_modulation(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6, *,
                     backend: str | None = None) -> Tensor:
    """LayerNorm(x) (1 + scale) + shift: x (B, N, D), scale and shift (B, D)."""
    return call("adaln_modulation", x, scale, shift, eps, backend=backend)


def gated_residual(x: Tensor, gate: Tensor, branch: Tensor, *, backend: str | None = None) -> Tensor:
    """x + gate · branch: x, branch (B, N, D), gate (B, D)."""
    return call("gated_residual", x, gate, branch, backend=backend)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, *, backend: str | None = None) -> Tensor:
    """diffusers' RMSNorm over the last dim of x, with `weight` (D,) or without (None)."""
    if weight is None:
        return call("rms_norm", x, eps, backend=backend)
    return call("weighted_rms_norm", x, weight, eps, backend=backend)


def rotary_qk(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor, *,
              backend: str | None = None) -> tuple[Tensor, Tensor]:
    """FLUX's rotary embedding on query and key (B, S, H, D) with cos, sin (S, D): the rotated (query, key)."""
    query, key = call("rotary_qk", query, key, cos, sin, backend=backend).unbind(0)  # (2, B, S, H, D) -> 2 x
    return query, key
