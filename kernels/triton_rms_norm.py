"""Fused RMSNorm in Triton, with and without weight (qk-norm of SD3.5/FLUX/SANA, SANA's caption norm), and one
backward pass for x and the weight.

Per row of D values with r = (mean(x²) + eps)^−½, x̂ = x r:
    out = x̂ w                                  (w = 1 without weight; fp32 arithmetic, one rounding to the output)
    ∂/∂x = r (g w − x̂ mean(g w x̂)),   ∂/∂w = Σ_rows g x̂
Rows are tiled (BLOCK_ROWS, BLOCK_D) so that short rows (head dims of 64-128) still fill a program. The backward
runs at most MAX_PROGRAMS programs, each over a contiguous run of row tiles, and writes its weight-gradient partial
into a (programs, D) fp32 buffer that torch sums (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sid_fast.kernels.block_ops import HALF_DTYPES, rms_norm_ref, weighted_rms_norm_ref  # the specification
from sid_fast.kernels.triton_common import block_sum, num_warps, split_rows, store_buffer

__all__ = ["rms_norm_ref", "weighted_rms_norm_ref", "forward", "backward", "weighted_forward", "weighted_backward"]

TILE_ELEMENTS = 4096
"""Elements per row tile: BLOCK_ROWS = TILE_ELEMENTS // BLOCK_D (at least 1)."""


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, weight_ptr, out_ptr, n_rows, dim, eps, HAS_WEIGHT: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < dim)
    offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_ROWS, BLOCK_D)
    inv_rms = 1.0 / tl.sqrt(block_sum(x * x, 1) / dim + eps)  # (BLOCK_ROWS,)
    out = x * inv_rms[:, None]
    if HAS_WEIGHT:
        out = out * tl.load(weight_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, weight_ptr, grad_ptr, g_x_ptr, partial_weight_ptr, n_rows, dim, eps,
                         tiles_per_program, HAS_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    weight = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    acc_weight = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        rows = (program * tiles_per_program + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < dim)
        offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(block_sum(x * x, 1) / dim + eps)
        x_hat = x * inv_rms[:, None]
        g_x_hat = grad * weight[None, :]
        g_x = inv_rms[:, None] * (g_x_hat - x_hat * (block_sum(g_x_hat * x_hat, 1) / dim)[:, None])
        tl.store(g_x_ptr + offsets, g_x.to(g_x_ptr.dtype.element_ty), mask=mask)
        acc_weight += grad * x_hat
    if HAS_WEIGHT:
        tl.store(partial_weight_ptr + program * dim + cols, block_sum(acc_weight, 0), mask=cols < dim)


def _tiles(dim: int) -> tuple[int, int]:
    block = triton.next_power_of_2(dim)
    return max(1, TILE_ELEMENTS // block), block


def _output_dtype(x: Tensor, weight: Tensor | None) -> torch.dtype:
    """The reference's result dtype: x's without weight, a half weight's, else fp32 (x · rsqrt(fp32) is fp32)."""
    if weight is None:
        return x.dtype
    return weight.dtype if weight.dtype in HALF_DTYPES else torch.float32


def _forward(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    x = x.contiguous()
    dim = x.shape[-1]
    n_rows = x.numel() // dim
    block_rows, block = _tiles(dim)
    dtype = _output_dtype(x, weight)
    out = store_buffer(x.shape, dtype, x.device)
    weight_arg = weight.contiguous() if weight is not None else x  # not read without weight
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](x, weight_arg, out, n_rows, dim, float(eps),
                                                             HAS_WEIGHT=weight is not None, BLOCK_ROWS=block_rows,
                                                             BLOCK_D=block, num_warps=num_warps(block_rows * block))
    return out.to(dtype)


def _backward(grad: Tensor, x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor | None]:
    x, grad = x.contiguous(), grad.contiguous()
    dim = x.shape[-1]
    n_rows = x.numel() // dim
    block_rows, block = _tiles(dim)
    tiles_per_program, n_programs = split_rows(triton.cdiv(n_rows, block_rows))
    g_x = store_buffer(x.shape, x.dtype, x.device)
    partial = torch.empty(n_programs, dim, dtype=torch.float32, device=x.device)
    weight_arg = weight.contiguous() if weight is not None else x
    _rms_norm_bwd_kernel[(n_programs,)](x, weight_arg, grad, g_x, partial, n_rows, dim, float(eps),
                                        tiles_per_program, HAS_WEIGHT=weight is not None, BLOCK_ROWS=block_rows,
                                        BLOCK_D=block, num_warps=num_warps(block_rows * block))
    g_weight = partial.sum(0).to(weight.dtype) if weight is not None else None
    return g_x.to(x.dtype), g_weight


def forward(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without weight: x (..., D) -> (..., D) in x's dtype; no autograd (the registry adds it)."""
    return _forward(x, None, eps)


def backward(grad: Tensor, x: Tensor, eps: float) -> tuple[Tensor]:
    return (_backward(grad, x, None, eps)[0],)


def weighted_forward(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm with weight (D,): output dtype as the reference (a half weight's dtype, else fp32)."""
    return _forward(x, weight, eps)


def weighted_backward(grad: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Gradients of Σ grad · out for (x, weight), each in its input's dtype."""
    return _backward(grad, x, weight, eps)
