"""Triton RMSNorm with and without weight (kernels/triton_rms_norm.py), run by the Triton interpreter on the CPU:
several tiles per program, diffusers' dtype promotion with a mixed weight, torch.compile sees one op. Values and
gradients against the reference at the standard shapes: tests/test_kernel_block_conformance.py."""

import pytest
import torch

from sid_fast import kernels
from sid_fast.kernels import conformance, triton_common, triton_rms_norm


def test_several_tiles_per_program(monkeypatch):
    """Row tiles of 2 rows (16-wide rows, 32-element tiles), 3 programs over 15 tiles: the weight-gradient partials
    of several tiles per program and a ragged last tile."""
    monkeypatch.setattr(triton_rms_norm, "TILE_ELEMENTS", 32)
    monkeypatch.setattr(triton_common, "MAX_PROGRAMS", 3)
    results = conformance.check_case("weighted_rms_norm", "triton", (29, 13), torch.float32)
    assert all(r.status == "pass" for r in results), conformance.report(results)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_weight_dtype_follows_diffusers(weight_dtype):
    """bf16 activations with an fp32 weight give fp32 (diffusers' promotion), with a bf16 weight bf16."""
    x = torch.randn(3, 5, 24).bfloat16().requires_grad_()
    weight = (1 + 0.1 * torch.randn(24)).to(weight_dtype).requires_grad_()
    got = kernels.rms_norm(x, weight, 1e-6, backend="triton")
    want = kernels.rms_norm(x, weight, 1e-6)
    assert got.dtype == want.dtype == (torch.float32 if weight_dtype == torch.float32 else torch.bfloat16)
    assert "sid_fast_weighted_rms_norm" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    grad = torch.randn(want.shape).to(want.dtype)
    for g, w in zip(torch.autograd.grad(got, (x, weight), grad), torch.autograd.grad(want, (x, weight), grad), strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=5e-2)


def test_compile_sees_one_op():
    x = torch.randn(2, 3, 13, requires_grad=True)
    weight = torch.randn(13, requires_grad=True)

    def total(x, weight):
        return kernels.rms_norm(x, weight, 1e-6, backend="triton").square().sum()

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, weight), (x, weight))
    want = torch.autograd.grad(kernels.rms_norm(x, weight, 1e-6).square().sum(), (x, weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_inductor_with_a_transposed_input(monkeypatch):
    """SD3.5 normalises q/k as a transposed (B, H, S, D) view. Inductor asserts the strides a custom op's fake
    promised; the backward's fake once copied the view's layout while the kernel returned contiguous gradients, and
    the compiled SD3.5 block with the block kernels failed on the H200 (docs/kernels.md). Caches off, so a graph
    compiled before a fix cannot hide it."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    query = torch.randn(2, 8, 4, 16).transpose(1, 2).requires_grad_()
    weight = (1 + 0.1 * torch.randn(16)).requires_grad_()

    def total(q, w):
        return kernels.rms_norm(q, w, 1e-6, backend="triton").square().sum()

    got = torch.autograd.grad(torch.compile(total)(query, weight), (query, weight))
    want = torch.autograd.grad(kernels.rms_norm(query, weight, 1e-6).square().sum(), (query, weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
