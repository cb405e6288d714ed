"""Fused fake-score loss (DESIGN.md §3, §4) in Triton: CFG combination at κ1, target ε − x_g, squared error
summed per sample, and one backward pass for every tensor input.

Per element r = u + κ1 (c − u) − (ε − x_g), loss_b = Σ r²  (fp32 accumulation). With g_r = 2 grad_b r:
    ∂/∂u = g_r − κ1 g_r,  ∂/∂c = κ1 g_r,  ∂/∂x_g = g_r,  ∂/∂ε = −g_r.
Launches: forward = the main kernel on a (B, ⌈N/BLOCK⌉) grid writing per-program partial sums into a (B, blocks)
fp32 buffer, then the generator loss's `_finish_kernel` summing them per sample in a fixed order (deterministic);
backward = one kernel (no reduction). Bytes each direction must move (B samples of N elements, element size e):
    forward:  read 4·B·N·e (u, c, x_g, ε); write 4·B (the loss)
    backward: read 4·B·N·e + 4·B (grad); write 4·B·N·e (the four gradients)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sid_fast.kernels.sid_generator_loss import LAUNCH, finish
from sid_fast.losses import cfg_fake_score_loss as cfg_fake_score_loss_ref  # the specification

__all__ = ["LAUNCH", "cfg_fake_score_loss_ref", "forward", "backward"]


@triton.jit
def _block_sum(values):
    # = tl.sum(values, axis=0); spelled through tl.reduce so that the interpreter takes its numpy fast path even
    # when triton.language was imported before TRITON_INTERPRET=1 was set (tl.sum is itself a jit function)
    return tl.reduce(values, 0, tl.standard._sum_combine)


@triton.jit
def _cfg_fake_score_loss_fwd_kernel(vu_ptr, vc_ptr, x_g_ptr, noise_ptr, partial_ptr, n_per_sample, n_blocks, scale,
                                    BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    base = sample.to(tl.int64) * n_per_sample
    velocity_uncond = tl.load(vu_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    velocity_cond = tl.load(vc_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    x_g = tl.load(x_g_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    residual = (velocity_uncond + scale * (velocity_cond - velocity_uncond)) - (noise - x_g)
    tl.store(partial_ptr + sample * n_blocks + block, _block_sum(tl.where(mask, residual * residual, 0.0)))


@triton.jit
def _cfg_fake_score_loss_bwd_kernel(vu_ptr, vc_ptr, x_g_ptr, noise_ptr, grad_ptr,
                                    g_vu_ptr, g_vc_ptr, g_x_g_ptr, g_noise_ptr, n_per_sample, scale,
                                    BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    base = sample.to(tl.int64) * n_per_sample
    grad = tl.load(grad_ptr + sample).to(tl.float32)
    velocity_uncond = tl.load(vu_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    velocity_cond = tl.load(vc_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    x_g = tl.load(x_g_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    residual = (velocity_uncond + scale * (velocity_cond - velocity_uncond)) - (noise - x_g)
    g_residual = 2.0 * grad * residual
    tl.store(g_vu_ptr + base + offsets, (g_residual - scale * g_residual).to(g_vu_ptr.dtype.element_ty), mask=mask)
    tl.store(g_vc_ptr + base + offsets, (scale * g_residual).to(g_vc_ptr.dtype.element_ty), mask=mask)
    tl.store(g_x_g_ptr + base + offsets, g_residual.to(g_x_g_ptr.dtype.element_ty), mask=mask)
    tl.store(g_noise_ptr + base + offsets, (-g_residual).to(g_noise_ptr.dtype.element_ty), mask=mask)


def _grad_buffer(like: Tensor) -> Tensor:
    # the interpreter casts fp32 -> bf16 by truncation (triton 3.9): store fp32 there and round in torch
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and like.dtype == torch.bfloat16
    return torch.empty_like(like, dtype=torch.float32 if interpreted else like.dtype)


def _block(n_per_sample: int) -> int:
    return min(LAUNCH["block"], triton.next_power_of_2(n_per_sample))


def forward(velocity_uncond: Tensor, velocity_cond: Tensor, scale: float, x_g: Tensor, noise: Tensor) -> Tensor:
    """Per-sample loss (B,) fp32 from four same-shape tensors (B, ...); no autograd (the registry adds it)."""
    batch, n = x_g.shape[0], x_g[0].numel()
    block = _block(n)
    n_blocks = triton.cdiv(n, block)
    tensors = [v.contiguous() for v in (velocity_uncond, velocity_cond, x_g, noise)]
    partial = torch.empty(1, batch, n_blocks, dtype=torch.float32, device=x_g.device)
    _cfg_fake_score_loss_fwd_kernel[(batch, n_blocks)](*tensors, partial, n, n_blocks, float(scale), BLOCK=block,
                                                       num_warps=LAUNCH["num_warps"])
    return finish(partial, None, 1.0)[0]


def backward(grad: Tensor, velocity_uncond: Tensor, velocity_cond: Tensor, scale: float, x_g: Tensor,
             noise: Tensor) -> tuple[Tensor, ...]:
    """Gradients of Σ_b grad_b · loss_b for (velocity_uncond, velocity_cond, x_g, noise), in their dtypes."""
    batch, n = x_g.shape[0], x_g[0].numel()
    block = _block(n)
    tensors = [v.contiguous() for v in (velocity_uncond, velocity_cond, x_g, noise)]
    grads = [_grad_buffer(v) for v in tensors]
    _cfg_fake_score_loss_bwd_kernel[(batch, triton.cdiv(n, block))](*tensors, grad.contiguous(), *grads, n,
                                                                     float(scale), BLOCK=block,
                                                                     num_warps=LAUNCH["num_warps"])
    return tuple(g.to(v.dtype) for g, v in zip(grads, tensors))
