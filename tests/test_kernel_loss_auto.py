"""`kernels.loss_backend=auto` (kernels/ops.py `resolve_loss_backend`) and the `compile` backend of the loss ops
(torch.compile of the reference, differentiated by autograd): what auto picks per device and dtype, the fallback
to `torch`, and the compiled reference against the reference through the conformance machinery."""

import importlib
import logging

import pytest
import torch

from sid_fast import kernels
from sid_fast.kernels import conformance
from sid_fast.kernels.ops import LOSS_AUTO, LOSS_OPS, check_loss_backend, resolve_loss_backend

ops = importlib.import_module("sid_fast.kernels.ops")  # `sid_fast.kernels.ops` the attribute is the registry's ops()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_resolves_to_a_registered_backend_on_cpu(dtype, caplog, monkeypatch):
    # the C++ extension counts as built (tests/test_kernel_cpp.py builds it; here that would cost ~40 s)
    monkeypatch.setattr(ops, "_cpp_devices", lambda: ("cpu",))
    with caplog.at_level(logging.INFO, logger="sid_fast.kernels"):
        backend = resolve_loss_backend("auto", torch.device("cpu"), dtype)
    assert backend != "auto" and all(backend in kernels.backends(op) for op in LOSS_OPS)
    lines = [r.getMessage() for r in caplog.records if "loss_backend=auto" in r.getMessage()]
    assert len(lines) == 1 and f": {backend} (" in lines[0], lines


def test_auto_table_names_registered_backends_with_a_source():
    assert {"cpu", "cuda"} <= {device for device, _ in LOSS_AUTO}
    for (device, dtype), (ranked, source) in LOSS_AUTO.items():
        assert device in ("cpu", "cuda") and hasattr(torch, dtype) and ranked and source
        assert all(b in kernels.backends(op) for b in ranked for op in LOSS_OPS), (device, dtype, ranked)


def test_unknown_device_or_dtype_falls_back_to_torch(caplog):
    with caplog.at_level(logging.INFO, logger="sid_fast.kernels"):
        assert resolve_loss_backend("auto", torch.device("meta"), torch.float32) == "torch"
        assert resolve_loss_backend("auto", "cpu", torch.float64) == "torch"
    assert "no measurement for meta/float32" in caplog.text and "no measurement for cpu/float64" in caplog.text


def test_other_names_pass_through_unchanged():
    for name in ("torch", "triton", "cpp", "compile", "mine"):
        assert resolve_loss_backend(name, "cpu", torch.float32) == name


def test_auto_skips_a_backend_this_machine_cannot_run(monkeypatch, caplog):
    """A ranked backend that is unavailable here (Triton on the CPU without the interpreter) gives way to the next."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(LOSS_AUTO, ("cpu", "float16"), (("triton", "compile"), "a test entry"))
    with caplog.at_level(logging.INFO, logger="sid_fast.kernels"):
        assert resolve_loss_backend("auto", "cpu", torch.float16) == "compile"
    assert "triton skipped: triton runs on ('cuda',)" in caplog.text and "a test entry" in caplog.text


def test_the_ops_accept_auto_and_resolve_once(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_AUTO_RESOLVED", {})
    monkeypatch.setitem(LOSS_AUTO, ("cpu", "float32"), (("torch",), "a test entry"))
    args = conformance.make_inputs("cfg_fake_score_loss", (2, 3, 5), torch.float32)
    with caplog.at_level(logging.INFO, logger="sid_fast.kernels"):
        for _ in range(2):
            out = kernels.cfg_fake_score_loss(*args, backend="auto")
    torch.testing.assert_close(out, kernels.cfg_fake_score_loss(*args))
    assert caplog.text.count("loss_backend=auto on cpu/float32: torch (a test entry)") == 1


def test_check_loss_backend_accepts_auto():
    check_loss_backend("auto")
    for backend in kernels.backends(LOSS_OPS[0]):
        check_loss_backend(backend)
    with pytest.raises(ValueError, match="kernels.loss_backend"):
        check_loss_backend("nope")


@pytest.mark.parametrize("op, dtype", [("cfg_sid_generator_loss", torch.float32),
                                       ("cfg_fake_score_loss", torch.bfloat16)], ids=str)
def test_compile_backend_conforms_on_cpu(op, dtype):
    """Values and every input gradient of torch.compile(reference) (inductor, C++ on the CPU) within the STYLE.md
    rule, one small shape with a ragged size; one dtype per op, since each compile costs 5-25 s on a cold cache."""
    ops.reset_compiled()
    results = conformance.check_backend(op, "compile", shapes=[(2, 3, 5, 7)], dtypes=[dtype])
    assert conformance.passed(results), conformance.report(results, failures_only=True)
    assert not any(r.status == "skip" for r in results)
    assert op in ops._COMPILED and op not in ops._COMPILE_FAILED  # it compiled, no silent fallback


def test_compile_backend_inside_an_outer_compile_traces_the_reference():
    """Under an outer torch.compile(fullgraph=True) the backend hands the reference to the outer trace."""
    op = "cfg_fake_score_loss"
    args = conformance.make_inputs(op, (2, 3, 5), torch.float32)

    def total(*values):
        return kernels.cfg_fake_score_loss(*values, backend="compile").sum()

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), kernels.cfg_fake_score_loss(*args).sum())


def test_compile_failure_falls_back_to_the_reference_once(monkeypatch, caplog):
    op = "cfg_fake_score_loss"
    ops.reset_compiled()

    def broken(function, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    args = conformance.make_inputs(op, (2, 3, 5), torch.float32)
    try:
        with caplog.at_level(logging.WARNING, logger="sid_fast.kernels"):
            first = kernels.cfg_fake_score_loss(*args, backend="compile")
            second = kernels.cfg_fake_score_loss(*args, backend="compile")
        torch.testing.assert_close(first, kernels.cfg_fake_score_loss(*args))
        torch.testing.assert_close(second, first)
        assert caplog.text.count("backend 'compile' failed (no C++ compiler here)") == 1
    finally:
        ops.reset_compiled()
