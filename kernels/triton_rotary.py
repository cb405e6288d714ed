"""Fused FLUX rotary embedding in Triton: q and k rotated in one launch (interleaved pairs, diffusers'
apply_rotary_emb with use_real=True, use_real_unbind_dim=-1, sequence_dim=1), and one backward pass for q, k,
cos and sin.

For the pair (e, o) = (x_2i, x_2i+1) at sequence position s, in fp32:
    out_e = x_e cos_e − x_o sin_e,   out_o = x_o cos_o + x_e sin_o
    ∂/∂x_e = g_e cos_e + g_o sin_o,  ∂/∂x_o = g_o cos_o − g_e sin_e
    ∂/∂cos_e = Σ g_e x_e,  ∂/∂cos_o = Σ g_o x_o,  ∂/∂sin_e = −Σ g_e x_o,  ∂/∂sin_o = Σ g_o x_e   (Σ over b, h, q and k)
Grid: one program per (b, s) row holding all heads of q and k; the output is the pair stacked, (2, B, S, H, D).
cos/sin gradients are summed over heads in the program and over the batch by torch from a (B, S, D) fp32 buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sid_fast.kernels.block_ops import rotary_qk_ref  # the specification
from sid_fast.kernels.triton_common import block_sum, num_warps, store_buffer

__all__ = ["rotary_qk_ref", "forward", "backward"]


@triton.jit
def _rotate_pairs(x_ptr, even, mask, cos_e, cos_o, sin_e, sin_o):
    x_e = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    x_o = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    return x_e * cos_e - x_o * sin_e, x_o * cos_o + x_e * sin_o


@triton.jit
def _unrotate_pairs(x_ptr, grad_ptr, g_x_ptr, even, mask, cos_e, cos_o, sin_e, sin_o):
    """Stores ∂/∂x of one of q, k; returns its per-element cos/sin gradient terms (even, odd)."""
    x_e = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    x_o = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    g_e = tl.load(grad_ptr + even, mask=mask, other=0.0).to(tl.float32)
    g_o = tl.load(grad_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_x_ptr + even, (g_e * cos_e + g_o * sin_o).to(g_x_ptr.dtype.element_ty), mask=mask)
    tl.store(g_x_ptr + even + 1, (g_o * cos_o - g_e * sin_e).to(g_x_ptr.dtype.element_ty), mask=mask)
    return g_e * x_e, g_o * x_o, -(g_e * x_o), g_o * x_e


@triton.jit
def _rotary_qk_fwd_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, heads, head_dim, plane,
                          BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0)  # b * S + s
    position = row % seq_len
    head = tl.arange(0, BLOCK_H)
    pair = tl.arange(0, BLOCK_HALF)
    pair_mask = pair < head_dim // 2
    mask = (head[:, None] < heads) & pair_mask[None, :]
    even = row.to(tl.int64) * heads * head_dim + head[:, None] * head_dim + 2 * pair[None, :]  # (BLOCK_H, BLOCK_HALF)
    freq = position * head_dim + 2 * pair
    cos_e = tl.load(cos_ptr + freq, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    cos_o = tl.load(cos_ptr + freq + 1, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin_e = tl.load(sin_ptr + freq, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin_o = tl.load(sin_ptr + freq + 1, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    q_e, q_o = _rotate_pairs(q_ptr, even, mask, cos_e, cos_o, sin_e, sin_o)
    tl.store(out_ptr + even, q_e.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + even + 1, q_o.to(out_ptr.dtype.element_ty), mask=mask)
    k_e, k_o = _rotate_pairs(k_ptr, even, mask, cos_e, cos_o, sin_e, sin_o)
    tl.store(out_ptr + plane + even, k_e.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + plane + even + 1, k_o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_qk_bwd_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, grad_ptr, g_q_ptr, g_k_ptr, partial_cos_ptr,
                          partial_sin_ptr, seq_len, heads, head_dim, plane,
                          BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0)
    position = row % seq_len
    head = tl.arange(0, BLOCK_H)
    pair = tl.arange(0, BLOCK_HALF)
    pair_mask = pair < head_dim // 2
    mask = (head[:, None] < heads) & pair_mask[None, :]
    even = row.to(tl.int64) * heads * head_dim + head[:, None] * head_dim + 2 * pair[None, :]
    freq = position * head_dim + 2 * pair
    cos_e = tl.load(cos_ptr + freq, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    cos_o = tl.load(cos_ptr + freq + 1, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin_e = tl.load(sin_ptr + freq, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin_o = tl.load(sin_ptr + freq + 1, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    q_cos_e, q_cos_o, q_sin_e, q_sin_o = _unrotate_pairs(q_ptr, grad_ptr, g_q_ptr, even, mask, cos_e, cos_o, sin_e,
                                                         sin_o)
    k_cos_e, k_cos_o, k_sin_e, k_sin_o = _unrotate_pairs(k_ptr, grad_ptr + plane, g_k_ptr, even, mask, cos_e, cos_o,
                                                         sin_e, sin_o)
    g_cos_e, g_cos_o, g_sin_e, g_sin_o = q_cos_e + k_cos_e, q_cos_o + k_cos_o, q_sin_e + k_sin_e, q_sin_o + k_sin_o
    partial = row.to(tl.int64) * head_dim + 2 * pair
    tl.store(partial_cos_ptr + partial, block_sum(g_cos_e, 0), mask=pair_mask)
    tl.store(partial_cos_ptr + partial + 1, block_sum(g_cos_o, 0), mask=pair_mask)
    tl.store(partial_sin_ptr + partial, block_sum(g_sin_e, 0), mask=pair_mask)
    tl.store(partial_sin_ptr + partial + 1, block_sum(g_sin_o, 0), mask=pair_mask)


def _blocks(heads: int, head_dim: int) -> tuple[int, int]:
    return triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)


def forward(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """query, key (B, S, H, D) of one dtype, cos, sin (S, D) -> the rotated pair (2, B, S, H, D)."""
    query, key, cos, sin = query.contiguous(), key.contiguous(), cos.contiguous(), sin.contiguous()
    batch, seq_len, heads, head_dim = query.shape
    block_h, block_half = _blocks(heads, head_dim)
    out = store_buffer((2, *query.shape), query.dtype, query.device)
    _rotary_qk_fwd_kernel[(batch * seq_len,)](query, key, cos, sin, out, seq_len, heads, head_dim, query.numel(),
                                              BLOCK_H=block_h, BLOCK_HALF=block_half,
                                              num_warps=num_warps(block_h * block_half))
    return out.to(query.dtype)


def backward(grad: Tensor, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
    """Gradients of Σ grad · out for (query, key, cos, sin), each in its input's dtype."""
    query, key, cos, sin, grad = (t.contiguous() for t in (query, key, cos, sin, grad))
    batch, seq_len, heads, head_dim = query.shape
    block_h, block_half = _blocks(heads, head_dim)
    g_query = store_buffer(query.shape, query.dtype, query.device)
    g_key = store_buffer(key.shape, key.dtype, key.device)
    partial_cos = torch.empty(batch, seq_len, head_dim, dtype=torch.float32, device=query.device)
    partial_sin = torch.empty_like(partial_cos)
    _rotary_qk_bwd_kernel[(batch * seq_len,)](query, key, cos, sin, grad, g_query, g_key, partial_cos, partial_sin,
                                              seq_len, heads, head_dim, query.numel(), BLOCK_H=block_h,
                                              BLOCK_HALF=block_half, num_warps=num_warps(block_h * block_half))
    return (g_query.to(query.dtype), g_key.to(key.dtype), partial_cos.sum(0).to(cos.dtype),
            partial_sin.sum(0).to(sin.dtype))
