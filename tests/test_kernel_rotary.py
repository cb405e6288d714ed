"""Triton FLUX rotary embedding on q and k (kernels/triton_rotary.py), run by the Triton interpreter on the CPU: the
reference is diffusers' apply_rotary_emb bit for bit, the kernel returns the pair, ineligible shapes fall back.
Values and gradients against the reference (head dims 8, 24, 26): tests/test_kernel_block_conformance.py."""

import pytest
import torch

from sid_fast import kernels
from sid_fast.kernels import conformance

OP = "rotary_qk"


def test_reference_is_diffusers_apply_rotary_emb():
    """The reference repeats diffusers' FLUX rotary (use_real=True, unbind dim -1, sequence dim 1) bit for bit."""
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

    query, key = torch.randn(2, 6, 3, 8).bfloat16(), torch.randn(2, 6, 3, 8).bfloat16()
    cos, sin = get_1d_rotary_pos_embed(8, torch.arange(6.0), use_real=True, repeat_interleave_real=True)
    got_query, got_key = kernels.rotary_qk(query, key, cos, sin)
    assert torch.equal(got_query, apply_rotary_emb(query, (cos, sin), sequence_dim=1))
    assert torch.equal(got_key, apply_rotary_emb(key, (cos, sin), sequence_dim=1))


def test_kernel_runs_and_returns_the_pair():
    query, key, cos, sin = conformance.make_inputs(OP, (2, 5, 3, 8), torch.float32)
    got = kernels.rotary_qk(query, key, cos, sin, backend="triton")
    want = kernels.rotary_qk(query, key, cos, sin)
    assert kernels.get_op(OP).implementations["triton"].eligible(query, key, cos, sin) is None
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_ineligible_shapes_fall_back(caplog):
    query, key = torch.randn(1, 4, 2, 6), torch.randn(1, 4, 2, 6)
    cos, sin = torch.randn(3, 6), torch.randn(3, 6)  # S = 3 != 4: the reference's broadcasting error, not ours
    with caplog.at_level("WARNING", logger="sid_fast.kernels"), pytest.raises(RuntimeError):
        kernels.rotary_qk(query, key, cos, sin, backend="triton")
    assert "cos/sin must be (S, D)" in caplog.text
