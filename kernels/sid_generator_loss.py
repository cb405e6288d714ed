"""Fused SiD generator loss (DESIGN.md §3, §4) in Triton: both CFG combinations, both x0-predictions, the loss
per sample, and one backward pass for every tensor input.

Per element, with v_r = u_r + κ4 (c_r − u_r), v_f = u_f + κ2 (c_f − u_f), y = x_t − t v:
    ℓ = (y_r − y_f) · [(y_r − x_g) − α (y_r − y_f)],     loss_b = s · λ_b · Σ ℓ      (fp32 accumulation)
Gradients with c_b = grad_b · s · λ_b and d = y_r − y_f:
    ∂/∂y_r = c ((y_r − x_g) + (1 − 2α) d),  ∂/∂y_f = c (2α d − (y_r − x_g)),  ∂/∂x_t = ∂/∂y_r + ∂/∂y_f,
    ∂/∂x_g = −c d,  ∂/∂v = −t ∂/∂y,  ∂/∂u = ∂/∂v − κ ∂/∂v,  ∂/∂c = κ ∂/∂v,
    ∂/∂t_b = Σ −(v_r ∂/∂y_r + v_f ∂/∂y_f),  ∂/∂λ_b = grad_b · s · Σ ℓ.
Grid: (B, ⌈N/BLOCK⌉) programs; per-sample sums go through a (B, blocks) fp32 buffer (deterministic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sid_fast.losses import cfg_sid_generator_loss as cfg_sid_generator_loss_ref  # the specification

__all__ = ["cfg_sid_generator_loss_ref", "forward", "backward"]


@triton.jit
def _block_sum(values):
    # = tl.sum(values, axis=0); spelled through tl.reduce so that the interpreter takes its numpy fast path even
    # when triton.language was imported before TRITON_INTERPRET=1 was set (tl.sum is itself a jit function)
    return tl.reduce(values, 0, tl.standard._sum_combine)


@triton.jit
def _cfg_sid_generator_loss_fwd_kernel(x_t_ptr, x_g_ptr, tu_ptr, tc_ptr, fu_ptr, fc_ptr, t_ptr, partial_ptr,
                                       n_per_sample, n_blocks, teacher_scale, fake_scale, alpha,
                                       BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    base = sample.to(tl.int64) * n_per_sample
    t = tl.load(t_ptr + sample).to(tl.float32)
    x_t = tl.load(x_t_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    x_g = tl.load(x_g_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    teacher_uncond = tl.load(tu_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    teacher_cond = tl.load(tc_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    fake_uncond = tl.load(fu_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    fake_cond = tl.load(fc_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    velocity_teacher = teacher_uncond + teacher_scale * (teacher_cond - teacher_uncond)
    velocity_fake = fake_uncond + fake_scale * (fake_cond - fake_uncond)
    x0_teacher = x_t - t * velocity_teacher
    x0_fake = x_t - t * velocity_fake
    diff = x0_teacher - x0_fake
    per_element = tl.where(mask, diff * ((x0_teacher - x_g) - alpha * diff), 0.0)
    tl.store(partial_ptr + sample * n_blocks + block, _block_sum(per_element))


@triton.jit
def _cfg_sid_generator_loss_bwd_kernel(x_t_ptr, x_g_ptr, tu_ptr, tc_ptr, fu_ptr, fc_ptr, t_ptr, coef_ptr,
                                       g_x_t_ptr, g_x_g_ptr, g_tu_ptr, g_tc_ptr, g_fu_ptr, g_fc_ptr,
                                       partial_t_ptr, partial_sum_ptr,
                                       n_per_sample, n_blocks, teacher_scale, fake_scale, alpha,
                                       BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    base = sample.to(tl.int64) * n_per_sample
    t = tl.load(t_ptr + sample).to(tl.float32)
    coef = tl.load(coef_ptr + sample)  # grad_b * s * λ_b, fp32
    x_t = tl.load(x_t_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    x_g = tl.load(x_g_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    teacher_uncond = tl.load(tu_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    teacher_cond = tl.load(tc_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    fake_uncond = tl.load(fu_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    fake_cond = tl.load(fc_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    velocity_teacher = teacher_uncond + teacher_scale * (teacher_cond - teacher_uncond)
    velocity_fake = fake_uncond + fake_scale * (fake_cond - fake_uncond)
    x0_teacher = x_t - t * velocity_teacher
    x0_fake = x_t - t * velocity_fake
    diff = x0_teacher - x0_fake
    gap = x0_teacher - x_g
    g_x0_teacher = coef * (gap + (1.0 - 2.0 * alpha) * diff)
    g_x0_fake = coef * (2.0 * alpha * diff - gap)
    g_velocity_teacher = -t * g_x0_teacher
    g_velocity_fake = -t * g_x0_fake
    tl.store(g_x_t_ptr + base + offsets, (g_x0_teacher + g_x0_fake).to(g_x_t_ptr.dtype.element_ty), mask=mask)
    tl.store(g_x_g_ptr + base + offsets, (-coef * diff).to(g_x_g_ptr.dtype.element_ty), mask=mask)
    g_tu = g_velocity_teacher - teacher_scale * g_velocity_teacher
    tl.store(g_tu_ptr + base + offsets, g_tu.to(g_tu_ptr.dtype.element_ty), mask=mask)
    tl.store(g_tc_ptr + base + offsets, (teacher_scale * g_velocity_teacher).to(g_tc_ptr.dtype.element_ty), mask=mask)
    g_fu = g_velocity_fake - fake_scale * g_velocity_fake
    tl.store(g_fu_ptr + base + offsets, g_fu.to(g_fu_ptr.dtype.element_ty), mask=mask)
    tl.store(g_fc_ptr + base + offsets, (fake_scale * g_velocity_fake).to(g_fc_ptr.dtype.element_ty), mask=mask)
    g_t = tl.where(mask, -(velocity_teacher * g_x0_teacher + velocity_fake * g_x0_fake), 0.0)
    per_element = tl.where(mask, diff * (gap - alpha * diff), 0.0)
    tl.store(partial_t_ptr + sample * n_blocks + block, _block_sum(g_t))
    tl.store(partial_sum_ptr + sample * n_blocks + block, _block_sum(per_element))


def _grad_buffer(like: Tensor) -> Tensor:
    # the interpreter casts fp32 -> bf16 by truncation (triton 3.9): store fp32 there and round in torch
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and like.dtype == torch.bfloat16
    return torch.empty_like(like, dtype=torch.float32 if interpreted else like.dtype)


def _block(n_per_sample: int) -> int:
    return min(2048, triton.next_power_of_2(n_per_sample))


def forward(x_t: Tensor, t: Tensor, x_g: Tensor, teacher_uncond: Tensor, teacher_cond: Tensor, fake_uncond: Tensor,
            fake_cond: Tensor, teacher_scale: float, fake_scale: float, weight: Tensor, alpha: float = 1.0,
            scale: float = 100.0) -> Tensor:
    """Per-sample loss (B,) fp32 from latents (B, ...) and t, weight (B,); no autograd (the registry adds it)."""
    batch, n = x_t.shape[0], x_t[0].numel()
    block = _block(n)
    n_blocks = triton.cdiv(n, block)
    latents = [v.contiguous() for v in (x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond)]
    partial = torch.empty(batch, n_blocks, dtype=torch.float32, device=x_t.device)
    _cfg_sid_generator_loss_fwd_kernel[(batch, n_blocks)](*latents, t.contiguous(), partial, n, n_blocks,
                                                          float(teacher_scale), float(fake_scale), float(alpha),
                                                          BLOCK=block)
    return scale * weight.float() * partial.sum(dim=1)


def backward(grad: Tensor, x_t: Tensor, t: Tensor, x_g: Tensor, teacher_uncond: Tensor, teacher_cond: Tensor,
             fake_uncond: Tensor, fake_cond: Tensor, teacher_scale: float, fake_scale: float, weight: Tensor,
             alpha: float = 1.0, scale: float = 100.0) -> tuple[Tensor, ...]:
    """Gradients of Σ_b grad_b · loss_b for (x_t, t, x_g, u_r, c_r, u_f, c_f, weight), each in its input's dtype."""
    batch, n = x_t.shape[0], x_t[0].numel()
    block = _block(n)
    n_blocks = triton.cdiv(n, block)
    latents = [v.contiguous() for v in (x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond)]
    grad = grad.float()
    coef = (grad * scale * weight.float()).contiguous()
    grads = [_grad_buffer(v) for v in latents]  # x_t, x_g, u_r, c_r, u_f, c_f
    partial_t = torch.empty(batch, n_blocks, dtype=torch.float32, device=x_t.device)
    partial_sum = torch.empty_like(partial_t)
    _cfg_sid_generator_loss_bwd_kernel[(batch, n_blocks)](*latents, t.contiguous(), coef, *grads, partial_t,
                                                          partial_sum,
                                                          n, n_blocks, float(teacher_scale), float(fake_scale),
                                                          float(alpha), BLOCK=block)
    g_x_t, g_x_g, g_tu, g_tc, g_fu, g_fc = (g.to(v.dtype) for g, v in zip(grads, latents))
    g_t = partial_t.sum(dim=1).to(t.dtype)
    g_weight = (grad * scale * partial_sum.sum(dim=1)).to(weight.dtype)
    return g_x_t, g_t, g_x_g, g_tu, g_tc, g_fu, g_fc, g_weight
