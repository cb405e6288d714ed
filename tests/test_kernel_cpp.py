"""The C++/OpenMP fused losses (csrc/sid_losses.cpp, backend `cpp`) against the references: values and every
input gradient over the standard shapes, fp32/fp16/bf16. Built on first use (about 25 s once, then cached)."""

import pytest
import torch

from sid_fast import kernels
from sid_fast.kernels import conformance, cpp
from sid_fast.kernels.ops import LOSS_OPS


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpp.load()  # raises with the compiler's message if the extension cannot be built here


@pytest.mark.parametrize("op", ["cfg_sid_generator_loss", "cfg_fake_score_loss"])
def test_cpp_matches_reference(op):
    results = conformance.check_backend(op, "cpp")
    assert conformance.passed(results), conformance.report(results, failures_only=True)
    assert not any(r.status == "skip" for r in results)


def test_cpp_large_sample_uses_several_chunks():
    """4 x 9001 (prime) elements per sample spans three 4096-element chunks reduced in order."""
    results = conformance.check_case("cfg_sid_generator_loss", "cpp", (2, 9001), torch.float32)
    assert all(r.status == "pass" for r in results), conformance.report(results)


def test_cpp_op_rejects_mismatched_shapes():
    x = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="latent shapes differ"):
        torch.ops.sid_fast_cpp.fake_forward(x, x, x, torch.randn(2, 6), 1.0)


def test_cpp_is_registered_for_both_ops():
    for op in LOSS_OPS:
        assert "cpp" in kernels.backends(op)
        assert cpp.devices()[0] == "cpu"


def test_cpp_bf16_stores_round_like_torch():
    """The C++ loops round fp32 -> bf16 themselves (to vectorise): bit-equal to torch's rounding, overflow to inf
    included, NaN kept NaN. With κ1 = 0 and x_g = ε = 0 the x_g and ε gradients are ±(2·grad_b)·u, one fp32
    product that torch computes the same, so any difference is the rounding."""
    gen = torch.Generator().manual_seed(3)
    vu = (torch.randn(3, 4111, generator=gen) * 4).bfloat16()
    vc = torch.randn(3, 4111, generator=gen).bfloat16()
    zero = torch.zeros_like(vu)
    vu[0, 5] = float("nan")
    vu[1, 7] = 3e38  # the gradient overflows to inf
    grad = torch.randn(3, generator=gen) + 2
    got = torch.ops.sid_fast_cpp.fake_backward(vu, vc, zero, zero, grad, 0.0)
    product = (2 * grad)[:, None] * vu.float()
    for g, want in ((got[2], product), (got[3], -product)):
        want = want.to(torch.bfloat16)
        assert g.dtype == torch.bfloat16 and torch.equal(g.isnan(), want.isnan()) and g[0, 5].isnan()
        finite = ~want.isnan()
        assert torch.equal(g[finite].view(torch.int16), want[finite].view(torch.int16))
        assert g[1, 7].isinf()
