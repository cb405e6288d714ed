"""The op registry and `sid-fast kernels check/bench`: user kernels plug in by registering a function, a wrong
kernel fails the conformance check with a readable report."""

import subprocess
import sys
import textwrap

import pytest
import torch

from sid_fast import kernels
from sid_fast.cli import main
from sid_fast.kernels import conformance
from sid_fast.losses import cfg_sid_generator_loss

OP = "cfg_sid_generator_loss"


def drop_alpha(x_t, t, x_g, tu, tc, fu, fc, teacher_scale, fake_scale, weight, alpha=1.0, scale=100.0):
    """A deliberately wrong kernel: ignores α."""
    return cfg_sid_generator_loss(x_t, t, x_g, tu, tc, fu, fc, teacher_scale, fake_scale, weight, 1.0, scale)


def test_registered_user_kernel_runs_through_the_custom_op():
    calls = []

    def mine(*args):
        calls.append(1)
        return cfg_sid_generator_loss(*args)

    kernels.register_kernel(OP, "mine", mine)
    try:
        results = conformance.check_backend(OP, "mine", shapes=[(2, 3, 5)], dtypes=[torch.float32])
        assert conformance.passed(results) and calls
    finally:
        kernels.unregister_kernel(OP, "mine")
    assert "mine" not in kernels.backends(OP)


def test_wrong_kernel_fails_with_a_readable_report():
    kernels.register_kernel(OP, "no_alpha", drop_alpha)
    try:
        results = conformance.check_backend(OP, "no_alpha", shapes=[(2, 3, 5)], dtypes=[torch.float32])
    finally:
        kernels.unregister_kernel(OP, "no_alpha")
    text = conformance.report(results, failures_only=True)
    assert not conformance.passed(results)
    failed = {r.quantity for r in results if r.status == "FAIL"}
    # α multiplies d² with d = t (v_f − v_r): loss, t, weight and all four velocity gradients change, x_t and x_g not
    assert failed == {"loss", "d/dt", "d/dteacher_uncond", "d/dteacher_cond", "d/dfake_uncond", "d/dfake_cond",
                      "d/dweight"}
    assert "FAIL" in text.splitlines()[-1] and "max err" in text.splitlines()[0]


def test_set_backend_and_unknown_backend():
    with pytest.raises(ValueError, match="has no backend 'nope'"):
        kernels.set_backend(OP, "nope")
    with pytest.raises(ValueError, match="unknown kernel op"):
        kernels.call("no_such_op")
    with pytest.raises(ValueError, match="reserved"):
        kernels.register_kernel(OP, "torch", drop_alpha)


def test_cli_check_exit_codes(tmp_path, capsys):
    """`sid-fast kernels check MODULE:FUNCTION --op NAME`: 1 with a report on a wrong kernel, 0 on a right one."""
    (tmp_path / "user_kernels.py").write_text(textwrap.dedent("""
        from sid_fast.losses import cfg_sid_generator_loss
        def no_alpha(x_t, t, x_g, tu, tc, fu, fc, ks, kf, weight, alpha=1.0, scale=100.0):
            return cfg_sid_generator_loss(x_t, t, x_g, tu, tc, fu, fc, ks, kf, weight, 1.0, scale)
        def right(*args):
            return cfg_sid_generator_loss(*args)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        code = main(["kernels", "check", "user_kernels:no_alpha", "--op", OP, "--dtypes", "float32"])
        out = capsys.readouterr().out
        assert code == 1 and "d/dteacher_cond" in out and out.strip().endswith("FAIL")
        assert main(["kernels", "check", "user_kernels:right", "--op", OP, "--dtypes", "float32,float16"]) == 0
        assert capsys.readouterr().out.strip().endswith("PASS")
    finally:
        sys.path.remove(str(tmp_path))
        kernels.unregister_kernel(OP, "user")
    assert main(["kernels", "check", "no_module_here:fn", "--op", OP]) == 2


def test_cli_reports_bad_function_spec(capsys):
    assert main(["kernels", "check", "no_colon", "--op", OP]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err


def test_cli_bench_times_every_provider(tmp_path, capsys):
    csv = tmp_path / "bench.csv"
    code = main(["kernels", "bench", "--op", "cfg_fake_score_loss", "--backends", "torch,cpp", "--shape", "2,3,8",
                 "--repeat", "2", "--csv", str(csv)])
    out = capsys.readouterr().out
    assert code == 0 and "vs eager" in out
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("op,provider,mode") and len(rows) == 1 + 4  # 2 providers x (fwd, fwd+bwd)


def test_cli_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "sid_fast.cli", "kernels", "list"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "cfg_sid_generator_loss: torch, compile, cpp, triton" in out.stdout
