"""Fused adaLN modulation in Triton: LayerNorm without affine and the per-sample x̂ (1 + scale) + shift in one pass,
and one backward pass for x, scale and shift.

Per token row with x̂ = (x − μ) r, r = (var + eps)^−½ and w = 1 + scale_b:
    out = x̂ w + shift_b
    ∂/∂x = r (g w − mean(g w) − x̂ mean(g w x̂)),   ∂/∂scale_b = Σ_tokens g x̂,   ∂/∂shift_b = Σ_tokens g
μ and r are recomputed in the backward (no saved statistics). Forward grid: one program per token row. Backward
grid: (B, chunks of tokens); each program sums its rows' scale/shift gradients into a (B, chunks, D) fp32 buffer
that torch sums (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sid_fast.kernels.block_ops import adaln_modulation_ref  # the specification
from sid_fast.kernels.triton_common import block_sum, num_warps, split_rows, store_buffer

__all__ = ["adaln_modulation_ref", "forward", "backward"]


@triton.jit
def _adaln_modulation_fwd_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, n_tokens, dim, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    sample = row // n_tokens
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    base = row.to(tl.int64) * dim
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    mean = block_sum(x, 0) / dim
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(block_sum(centered * centered, 0) / dim + eps)
    scale = tl.load(scale_ptr + sample * dim + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + sample * dim + cols, mask=mask, other=0.0).to(tl.float32)
    out = centered * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + base + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_modulation_bwd_kernel(x_ptr, scale_ptr, grad_ptr, g_x_ptr, partial_scale_ptr, partial_shift_ptr,
                                 n_tokens, dim, rows_per_program, n_chunks, eps, BLOCK_D: tl.constexpr):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    weight = 1.0 + tl.load(scale_ptr + sample * dim + cols, mask=mask, other=0.0).to(tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, rows_per_program):
        token = chunk * rows_per_program + i
        row_mask = mask & ((cols * 0 + token) < n_tokens)  # a vector mask (the interpreter rejects a scalar &)
        base = (sample.to(tl.int64) * n_tokens + token) * dim
        x = tl.load(x_ptr + base + cols, mask=row_mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + base + cols, mask=row_mask, other=0.0).to(tl.float32)
        mean = block_sum(x, 0) / dim
        centered = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(block_sum(centered * centered, 0) / dim + eps)
        x_hat = centered * rstd
        g_x_hat = grad * weight
        g_x = rstd * (g_x_hat - block_sum(g_x_hat, 0) / dim - x_hat * (block_sum(g_x_hat * x_hat, 0) / dim))
        tl.store(g_x_ptr + base + cols, g_x.to(g_x_ptr.dtype.element_ty), mask=row_mask)
        acc_scale += grad * x_hat
        acc_shift += grad
    partial = (sample * n_chunks + chunk) * dim + cols
    tl.store(partial_scale_ptr + partial, acc_scale, mask=mask)
    tl.store(partial_shift_ptr + partial, acc_shift, mask=mask)


def forward(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """x (B, N, D), scale and shift (B, D) of x's dtype -> (B, N, D); no autograd (the registry adds it)."""
    x, scale, shift = x.contiguous(), scale.contiguous(), shift.contiguous()
    batch, n_tokens, dim = x.shape
    block = triton.next_power_of_2(dim)
    out = store_buffer(x.shape, x.dtype, x.device)
    _adaln_modulation_fwd_kernel[(batch * n_tokens,)](x, scale, shift, out, n_tokens, dim, float(eps),
                                                      BLOCK_D=block, num_warps=num_warps(block))
    return out.to(x.dtype)


def backward(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ grad · out for (x, scale, shift), each in its input's dtype."""
    x, scale, grad = x.contiguous(), scale.contiguous(), grad.contiguous()
    batch, n_tokens, dim = x.shape
    block = triton.next_power_of_2(dim)
    rows_per_program, n_chunks = split_rows(n_tokens, groups=batch)
    g_x = store_buffer(x.shape, x.dtype, x.device)
    partial_scale = torch.empty(batch, n_chunks, dim, dtype=torch.float32, device=x.device)
    partial_shift = torch.empty_like(partial_scale)
    _adaln_modulation_bwd_kernel[(batch, n_chunks)](x, scale, grad, g_x, partial_scale, partial_shift, n_tokens, dim,
                                                    rows_per_program, n_chunks, float(eps), BLOCK_D=block,
                                                    num_warps=num_warps(block))
    return g_x.to(x.dtype), partial_scale.sum(1).to(scale.dtype), partial_shift.sum(1).to(shift.dtype)
