"""Triton gated residual x + gate · branch (kernels/triton_gated_residual.py) against its reference, run by the Triton
interpreter on the CPU: values and all three gradients, fp32/fp16/bf16, STYLE.md tolerance."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest
import torch

from sid_fast import kernels
from sid_fast.kernels import conformance, triton_common

OP = "gated_residual"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", conformance.op_shapes(OP), ids=str)
def test_triton_matches_reference(shape, dtype):
    results = conformance.check_case(OP, "triton", shape, dtype)
    assert len(results) == 4 and all(r.status == "pass" for r in results), conformance.report(results)


def test_several_rows_per_program_and_a_ragged_tail(monkeypatch):
    monkeypatch.setattr(triton_common, "MAX_PROGRAMS", 6)
    results = conformance.check_case(OP, "triton", (2, 11, 13), torch.float16)
    assert all(r.status == "pass" for r in results), conformance.report(results)


def test_kernel_runs_and_is_not_the_reference():
    args = conformance.make_inputs(OP, (2, 3, 13), torch.float32)
    leaves = [a.requires_grad_() for a in args]
    out = kernels.gated_residual(*leaves, backend="triton")
    assert "sid_fast_gated_residual" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, kernels.gated_residual(*leaves), rtol=1e-6, atol=1e-6)
