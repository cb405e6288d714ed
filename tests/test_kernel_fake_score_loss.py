"""Triton fused fake-score loss (kernels/fake_score_loss.py) against the reference of sid_fast.losses, run by the
Triton interpreter on the CPU: values and every input gradient, fp32/fp16/bf16, STYLE.md tolerance."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest
import torch

from sid_fast import kernels
from sid_fast.kernels import conformance

OP = "cfg_fake_score_loss"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", conformance.STANDARD_SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    results = conformance.check_case(OP, "triton", shape, dtype)
    assert len(results) == 5 and all(r.status == "pass" for r in results), conformance.report(results)


def test_mixed_dtypes_keep_each_gradient_dtype():
    """fp16 velocities with fp32 x_g and noise (a bf16/fp16 network in an fp32 loop): each gradient in its dtype."""
    args = conformance.make_inputs(OP, (2, 3, 11), torch.float32)
    args[0], args[1] = args[0].half(), args[1].half()
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    grad_out = torch.randn(2)
    got = torch.autograd.grad(kernels.cfg_fake_score_loss(*leaves, backend="triton"), tensors, grad_out)
    want = torch.autograd.grad(kernels.cfg_fake_score_loss(*leaves), tensors, grad_out)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-3, atol=1e-3)


def test_ineligible_input_falls_back_with_a_log_line(caplog):
    """float64 is not a kernel dtype: the reference runs and one warning names the reason."""
    velocity_uncond, velocity_cond, x_g, noise = (torch.randn(3, 7, dtype=torch.float64) for _ in range(4))
    with caplog.at_level("WARNING", logger="sid_fast.kernels"):
        out = kernels.cfg_fake_score_loss(velocity_uncond, velocity_cond, 2.0, x_g, noise, backend="triton")
    assert out.grad_fn is None or "sid_fast" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, kernels.cfg_fake_score_loss(velocity_uncond, velocity_cond, 2.0, x_g, noise))
    assert "not eligible" in caplog.text and "torch.float64 not supported" in caplog.text
