"""Triton adaLN modulation (kernels/triton_adaln_modulation.py), run by the Triton interpreter on the CPU: the kernel is
the one dispatched, mixed dtypes fall back, torch.compile sees one op. Values and gradients against the reference:
tests/test_kernel_block_conformance.py."""

import torch

from sid_fast import kernels
from sid_fast.kernels import conformance

OP = "adaln_modulation"


def test_kernel_runs_and_is_not_the_reference():
    args = conformance.make_inputs(OP, (2, 3, 13), torch.float32)
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = kernels.call(OP, *leaves, backend="triton")
    assert "sid_fast_adaln_modulation" in type(out.grad_fn).__name__


def test_mixed_dtypes_fall_back_with_a_log_line(caplog):
    """fp32 scale with a bf16 x is the reference's business (type promotion): the kernel declines and says why."""
    x, scale, shift = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(2, 8), torch.randn(2, 8)
    with caplog.at_level("WARNING", logger="sid_fast.kernels"):
        out = kernels.adaln_modulation(x, scale, shift, backend="triton")
    assert out.dtype == torch.float32 and torch.equal(out, kernels.adaln_modulation(x, scale, shift))
    assert "not eligible" in caplog.text and "mixed dtypes" in caplog.text


def test_compile_sees_one_op():
    """torch.compile(fullgraph=True) traces through the custom op (fake impl + registered autograd)."""
    args = conformance.make_inputs(OP, (2, 3, 13), torch.float32)
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]

    def total(x, scale, shift, eps):
        return kernels.adaln_modulation(x, scale, shift, eps, backend="triton").square().sum()

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), tensors)
    want = torch.autograd.grad(kernels.adaln_modulation(*leaves).square().sum(), tensors)  # the reference
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
