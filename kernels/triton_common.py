"""Pieces shared by the Triton kernels of the DiT block ops (triton_adaln_modulation.py, triton_gated_residual.py,
triton_rms_norm.py, triton_rotary.py): a reduction the interpreter runs fast, output buffers that survive the interpreter's bf16 cast, and the
launch sizes."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_PROGRAMS = 1024
"""Upper bound on the programs of a reducing backward kernel (a few waves of an H100's 132 SMs)."""


@triton.jit
def block_sum(values, axis: tl.constexpr):
    # = tl.sum(values, axis); spelled through tl.reduce so that the interpreter takes its numpy fast path even
    # when triton.language was imported before TRITON_INTERPRET=1 was set (tl.sum is itself a jit function)
    return tl.reduce(values, axis, tl.standard._sum_combine)


def store_buffer(shape, dtype: torch.dtype, device) -> Tensor:
    """An output buffer for a kernel store: fp32 for bf16 under TRITON_INTERPRET=1, where triton 3.9 casts fp32 ->
    bf16 by truncation (the caller rounds with `.to(dtype)`), else `dtype` itself."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16
    return torch.empty(shape, dtype=torch.float32 if interpreted else dtype, device=device)


def num_warps(block: int) -> int:
    """Warps for a program holding `block` elements per row tile."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def split_rows(n_rows: int, groups: int = 1) -> tuple[int, int]:
    """(rows per program, programs per group) so that groups x programs stays near MAX_PROGRAMS."""
    programs = max(1, min(n_rows, triton.cdiv(MAX_PROGRAMS, groups)))
    rows_per_program = triton.cdiv(n_rows, programs)
    return rows_per_program, triton.cdiv(n_rows, rows_per_program)
