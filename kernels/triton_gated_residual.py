"""Fused adaLN-zero gated residual in Triton: x + gate_b · branch in one pass, and one backward pass for all three.

Per token row of sample b:  out = x + gate_b branch;  ∂/∂x = g,  ∂/∂branch = gate_b g,  ∂/∂gate_b = Σ_tokens g branch.
Forward grid: one program per token row. Backward grid: (B, chunks of tokens) with the gate gradient summed per
program into a (B, chunks, D) fp32 buffer that torch sums (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sid_fast.kernels.block_ops import gated_residual_ref  # the specification
from sid_fast.kernels.triton_common import num_warps, split_rows, store_buffer

__all__ = ["gated_residual_ref", "forward", "backward"]


@triton.jit
def _gated_residual_fwd_kernel(x_ptr, gate_ptr, branch_ptr, out_ptr, n_tokens, dim, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    sample = row // n_tokens
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    base = row.to(tl.int64) * dim
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    branch = tl.load(branch_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + sample * dim + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + cols, (x + gate * branch).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(gate_ptr, branch_ptr, grad_ptr, g_x_ptr, g_branch_ptr, partial_gate_ptr,
                               n_tokens, dim, rows_per_program, n_chunks, BLOCK_D: tl.constexpr):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    gate = tl.load(gate_ptr + sample * dim + cols, mask=mask, other=0.0).to(tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, rows_per_program):
        token = chunk * rows_per_program + i
        row_mask = mask & ((cols * 0 + token) < n_tokens)  # a vector mask (the interpreter rejects a scalar &)
        base = (sample.to(tl.int64) * n_tokens + token) * dim
        grad = tl.load(grad_ptr + base + cols, mask=row_mask, other=0.0).to(tl.float32)
        branch = tl.load(branch_ptr + base + cols, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(g_x_ptr + base + cols, grad.to(g_x_ptr.dtype.element_ty), mask=row_mask)
        tl.store(g_branch_ptr + base + cols, (gate * grad).to(g_branch_ptr.dtype.element_ty), mask=row_mask)
        acc_gate += grad * branch
    tl.store(partial_gate_ptr + (sample * n_chunks + chunk) * dim + cols, acc_gate, mask=mask)


def forward(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """x, branch (B, N, D), gate (B, D), one dtype -> (B, N, D); no autograd (the registry adds it)."""
    x, gate, branch = x.contiguous(), gate.contiguous(), branch.contiguous()
    batch, n_tokens, dim = x.shape
    block = triton.next_power_of_2(dim)
    out = store_buffer(x.shape, x.dtype, x.device)
    _gated_residual_fwd_kernel[(batch * n_tokens,)](x, gate, branch, out, n_tokens, dim, BLOCK_D=block,
                                                    num_warps=num_warps(block))
    return out.to(x.dtype)


def backward(grad: Tensor, x: Tensor, gate: Tensor, branch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ grad · out for (x, gate, branch), each in its input's dtype."""
    gate, branch, grad = gate.contiguous(), branch.contiguous(), grad.contiguous()
    batch, n_tokens, dim = branch.shape
    block = triton.next_power_of_2(dim)
    rows_per_program, n_chunks = split_rows(n_tokens, groups=batch)
    g_x = store_buffer(x.shape, x.dtype, x.device)
    g_branch = store_buffer(branch.shape, branch.dtype, branch.device)
    partial_gate = torch.empty(batch, n_chunks, dim, dtype=torch.float32, device=x.device)
    _gated_residual_bwd_kernel[(batch, n_chunks)](gate, branch, grad, g_x, g_branch, partial_gate, n_tokens, dim,
                                                  rows_per_program, n_chunks, BLOCK_D=block,
                                                  num_warps=num_warps(block))
    return g_x.to(x.dtype), partial_gate.sum(1).to(gate.dtype), g_branch.to(branch.dtype)
