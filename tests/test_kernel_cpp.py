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
