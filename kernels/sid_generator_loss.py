"""Fused SiD generator loss (DESIGN.md §3, §4) in Triton: both CFG combinations, both x0-predictions, the loss
per sample, and one backward pass for every tensor input.

Per element, with v_r = u_r + κ4 (c_r − u_r), v_f = u_f + κ2 (c_f − u_f), y = x_t − t v:
    ℓ = (y_r − y_f) · [(y_r − x_g) − α (y_r − y_f)],     loss_b = s · λ_b · Σ ℓ      (fp32 accumulation)
Gradients with c_b = grad_b · s · λ_b and d = y_r − y_f:
    ∂/∂y_r = c ((y_r − x_g) + (1 − 2α) d),  ∂/∂y_f = c (2α d − (y_r − x_g)),  ∂/∂x_t = ∂/∂y_r + ∂/∂y_f,
    ∂/∂x_g = −c d,  ∂/∂v = −t ∂/∂y,  ∂/∂u = ∂/∂v − κ ∂/∂v,  ∂/∂c = κ ∂/∂v,
    ∂/∂t_b = Σ −(v_r ∂/∂y_r + v_f ∂/∂y_f),  ∂/∂λ_b = grad_b · s · Σ ℓ.
Launches: forward = the main kernel on a (B, ⌈N/BLOCK⌉) grid, each program writing its partial sum into a
(B, blocks) fp32 buffer, then `_finish_kernel` (one program per sample) summing the partials in a fixed order and
applying s·λ_b: deterministic, two launches. Backward = the main backward kernel (c_b = grad_b·s·λ_b computed in
the program; six gradients written; partials of ∂/∂t and Σℓ in a (2, B, blocks) buffer) and one `_finish_kernel`.
Bytes each direction must move (B samples of N elements, e = element size of the latents, per-sample vectors fp32):
    forward:  read 6·B·N·e (x_t, x_g, u_r, c_r, u_f, c_f) + 8·B (t, λ); write 4·B (the loss)
    backward: read 6·B·N·e + 12·B (t, λ, grad); write 6·B·N·e (the six latent gradients) + 8·B (∂/∂t, ∂/∂λ)
(the partial buffers add 4·B·⌈N/BLOCK⌉ bytes per row, written and read back: < 0.1 % of the above at BLOCK=2048).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from sid_fast.losses import cfg_sid_generator_loss as cfg_sid_generator_loss_ref  # the specification

__all__ = ["LAUNCH", "cfg_sid_generator_loss_ref", "forward", "backward"]

LAUNCH = {"block": 2048, "num_warps": 4, "finish_block": 1024}
"""Elements per program (a power of two) and warps of the main kernels (benchmarks/gpu/check_kernels.py sweeps
them), and partials per step of `_finish_kernel`'s loop (powers of two; shared by kernels/fake_score_loss.py)."""


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
def _row_total(partial_ptr, base, n_blocks, P_BLOCK: tl.constexpr):
    acc = tl.zeros([P_BLOCK], dtype=tl.float32)
    for start in range(0, n_blocks, P_BLOCK):
        offsets = start + tl.arange(0, P_BLOCK)
        acc += tl.load(partial_ptr + base + offsets, mask=offsets < n_blocks, other=0.0)
    return _block_sum(acc)


@triton.jit
def _finish_kernel(partial_ptr, out_ptr, out2_ptr, factor_ptr, batch, n_blocks, scale, TWO_ROWS: tl.constexpr,
                   SCALED: tl.constexpr, P_BLOCK: tl.constexpr):
    # one program per sample; each row's partials summed in a fixed order. One row: out = Σ, or (scale ·
    # factor_b) · Σ when SCALED (the generator loss s · λ_b · Σℓ). Two rows (the backward): out = Σ row 0 (∂/∂t),
    # out2 = (scale · factor_b) · Σ row 1 (∂/∂λ = (grad_b · s) · Σℓ)
    sample = tl.program_id(0)
    first = _row_total(partial_ptr, sample.to(tl.int64) * n_blocks, n_blocks, P_BLOCK)
    if TWO_ROWS:
        tl.store(out_ptr + sample, first)
        second = _row_total(partial_ptr, (batch + sample).to(tl.int64) * n_blocks, n_blocks, P_BLOCK)
        tl.store(out2_ptr + sample, (scale * tl.load(factor_ptr + sample).to(tl.float32)) * second)
    elif SCALED:
        tl.store(out_ptr + sample, (scale * tl.load(factor_ptr + sample).to(tl.float32)) * first)
    else:
        tl.store(out_ptr + sample, first)


def finish(partial: Tensor, factor: Tensor | None, scale: float) -> list[Tensor]:
    """Per-sample (B,) fp32 results from the (rows, B, blocks) partials (`_finish_kernel`): one row: Σ, or
    (scale · factor) · Σ when `factor` is given; two rows: [Σ row 0, (scale · factor) · Σ row 1]."""
    rows, batch, n_blocks = partial.shape
    outs = [torch.empty(batch, dtype=torch.float32, device=partial.device) for _ in range(rows)]
    _finish_kernel[(batch,)](partial, outs[0], outs[-1], partial if factor is None else factor, batch, n_blocks,
                             float(scale), TWO_ROWS=rows == 2, SCALED=factor is not None,
                             P_BLOCK=min(LAUNCH["finish_block"], triton.next_power_of_2(n_blocks)))
    return outs


@triton.jit
def _cfg_sid_generator_loss_bwd_kernel(x_t_ptr, x_g_ptr, tu_ptr, tc_ptr, fu_ptr, fc_ptr, t_ptr, grad_ptr, weight_ptr,
                                       g_x_t_ptr, g_x_g_ptr, g_tu_ptr, g_tc_ptr, g_fu_ptr, g_fc_ptr, partial_ptr,
                                       batch, n_per_sample, n_blocks, teacher_scale, fake_scale, alpha, scale,
                                       BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    base = sample.to(tl.int64) * n_per_sample
    t = tl.load(t_ptr + sample).to(tl.float32)
    # c_b = grad_b · s · λ_b in fp32, in the reference's order ((grad · s) · λ)
    coef = (tl.load(grad_ptr + sample).to(tl.float32) * scale) * tl.load(weight_ptr + sample).to(tl.float32)
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
    tl.store(partial_ptr + sample * n_blocks + block, _block_sum(g_t))  # row 0: ∂/∂t partials
    tl.store(partial_ptr + (batch + sample) * n_blocks + block, _block_sum(per_element))  # row 1: Σℓ partials


def _grad_buffer(like: Tensor) -> Tensor:
    # the interpreter casts fp32 -> bf16 by truncation (triton 3.9): store fp32 there and round in torch
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and like.dtype == torch.bfloat16
    return torch.empty_like(like, dtype=torch.float32 if interpreted else like.dtype)


def _block(n_per_sample: int) -> int:
    return min(LAUNCH["block"], triton.next_power_of_2(n_per_sample))


def forward(x_t: Tensor, t: Tensor, x_g: Tensor, teacher_uncond: Tensor, teacher_cond: Tensor, fake_uncond: Tensor,
            fake_cond: Tensor, teacher_scale: float, fake_scale: float, weight: Tensor, alpha: float = 1.0,
            scale: float = 100.0) -> Tensor:
    """Per-sample loss (B,) fp32 from latents (B, ...) and t, weight (B,); no autograd (the registry adds it)."""
    batch, n = x_t.shape[0], x_t[0].numel()
    block = _block(n)
    n_blocks = triton.cdiv(n, block)
    latents = [v.contiguous() for v in (x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond)]
    partial = torch.empty(1, batch, n_blocks, dtype=torch.float32, device=x_t.device)
    _cfg_sid_generator_loss_fwd_kernel[(batch, n_blocks)](*latents, t.contiguous(), partial, n, n_blocks,
                                                          float(teacher_scale), float(fake_scale), float(alpha),
                                                          BLOCK=block, num_warps=LAUNCH["num_warps"])
    return finish(partial, weight.contiguous(), scale)[0]


def backward(grad: Tensor, x_t: Tensor, t: Tensor, x_g: Tensor, teacher_uncond: Tensor, teacher_cond: Tensor,
             fake_uncond: Tensor, fake_cond: Tensor, teacher_scale: float, fake_scale: float, weight: Tensor,
             alpha: float = 1.0, scale: float = 100.0) -> tuple[Tensor, ...]:
    """Gradients of Σ_b grad_b · loss_b for (x_t, t, x_g, u_r, c_r, u_f, c_f, weight), each in its input's dtype."""
    batch, n = x_t.shape[0], x_t[0].numel()
    block = _block(n)
    n_blocks = triton.cdiv(n, block)
    latents = [v.contiguous() for v in (x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond)]
    grad, weight = grad.contiguous(), weight.contiguous()
    grads = [_grad_buffer(v) for v in latents]  # x_t, x_g, u_r, c_r, u_f, c_f
    partial = torch.empty(2, batch, n_blocks, dtype=torch.float32, device=x_t.device)
    _cfg_sid_generator_loss_bwd_kernel[(batch, n_blocks)](*latents, t.contiguous(), grad, weight, *grads, partial,
                                                          batch, n, n_blocks, float(teacher_scale), float(fake_scale),
                                                          float(alpha), float(scale), BLOCK=block,
                                                          num_warps=LAUNCH["num_warps"])
    g_t, g_weight = finish(partial, grad, scale)  # Σ ∂/∂t; (grad · s) · Σℓ
    g_x_t, g_x_g, g_tu, g_tc, g_fu, g_fc = (g.to(v.dtype) for g, v in zip(grads, latents))
    return g_x_t, g_t.to(t.dtype), g_x_g, g_tu, g_tc, g_fu, g_fc, g_weight.to(weight.dtype)
