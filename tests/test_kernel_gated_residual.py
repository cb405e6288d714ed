"""Triton gated residual x + gate · branch (kernels/triton_gated_residual.py), run by the Triton interpreter on the CPU:
the kernel is the one dispatched. Values and gradients against the reference: tests/test_kernel_block_conformance.py."""

import torch

from sid_fast import kernels
from sid_fast.kernels import conformance

OP = "gated_residual"


def test_kernel_runs_and_is_not_the_reference():
    args = conformance.make_inputs(OP, (2, 3, 13), torch.float32)
    leaves = [a.requires_grad_() for a in args]
    out = kernels.gated_residual(*leaves, backend="triton")
    assert "sid_fast_gated_residual" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, kernels.gated_residual(*leaves), rtol=1e-6, atol=1e-6)
