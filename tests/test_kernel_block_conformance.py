"""The Triton DiT block kernels (kernels/triton_*.py) against their references (kernels/block_ops.py), run by the
Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1): values and every gradient, fp32/fp16/bf16,
STYLE.md tolerance, at each op's standard shapes (prime and non-power-of-two widths: 13, 24, 48; rotary head dims 8,
24, 26), and with several rows per program and a ragged tail. Op-specific behaviour is in test_kernel_<op>.py."""

import pytest
import torch

from sid_fast.kernels import conformance, triton_common

CHECKS = {"adaln_modulation": 4, "gated_residual": 4, "rms_norm": 2, "weighted_rms_norm": 3, "rotary_qk": 5}
"""Comparisons per case: the output and each input gradient."""
SHAPES_OF = {"weighted_rms_norm": "rms_norm"}

CASES = [(op, shape) for op in CHECKS for shape in conformance.op_shapes(SHAPES_OF.get(op, op))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("op", "shape"), CASES, ids=str)
def test_triton_matches_reference(op, shape, dtype):
    results = conformance.check_case(op, "triton", shape, dtype)
    assert len(results) == CHECKS[op], conformance.report(results)
    assert all(r.status == "pass" for r in results), conformance.report(results)


@pytest.mark.parametrize(("op", "dtype"), [("adaln_modulation", torch.float32), ("gated_residual", torch.float16)],
                         ids=str)
def test_several_rows_per_program_and_a_ragged_tail(op, dtype, monkeypatch):
    """The backward sums per-sample gradients (scale/shift, gate) over token chunks: 11 tokens in programs of 4 rows,
    the last one short."""
    monkeypatch.setattr(triton_common, "MAX_PROGRAMS", 6)
    results = conformance.check_case(op, "triton", (2, 11, 13), dtype)
    assert all(r.status == "pass" for r in results), conformance.report(results)
