"""The worst moments to die (docs/reliability.md), on CPU/gloo.

- SIGKILL inside a checkpoint save, at each of its phases (local engine, real SIGKILLs of real processes): the next
  start resumes from the newest complete checkpoint and reproduces the uninterrupted run's losses exactly;
- saving the step `latest` names again never removes it before `latest` moves;
- a full disk during a save: a clear CheckpointError (one line from `sid-fast distill`), the previous checkpoint and
  `latest` intact, no partial files left;
- a shard file deleted while a run streams it: counted as bad data (`missing_shard`), not a crash; past
  data.max_bad_fraction a BadDataError that names the shard, on one line even from a DataLoader worker;
- one rank of a 2-rank run hanging mid-step (plain gloo) or dying mid-save (DeepSpeed ZeRO-3, launched per rank as
  on a cluster): the other exits within a bounded time naming the lost rank; the ZeRO-3 run then resumes from the
  previous checkpoint and reproduces the losses of the uninterrupted computation.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ports import free_port

from sid_fast.checkpoint import latest_checkpoint, verify

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "engine_worker.py"
ITERATIONS = 6
LOCAL = ["engine.kind=local", f"train.iterations={ITERATIONS}", "train.ckpt_every=1", "train.keep_checkpoints=2"]
PHASES = {"engine": 2, "manifest": 2, "renamed": 2, "prune": 3}  # kill phase -> the checkpoint `latest` then names


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, **extra}


def _history(out: Path, rank: int = 0) -> dict[int, tuple[float, float]]:
    records = json.loads((out / f"history-rank{rank}.json").read_text())
    return {r["step"]: (r["loss_fake"], r["loss_generator"]) for r in records}


def _in_process(out: Path, *overrides: str) -> dict[int, tuple[float, float]]:
    """tests/engine_worker.py's main in this process, single-threaded like the killed subprocesses."""
    from engine_worker import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out.mkdir(parents=True, exist_ok=True)
        main([str(out), *overrides])
    finally:
        torch.set_num_threads(threads)
    return _history(out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[int, tuple[float, float]]]:
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    return out, _in_process(out, *LOCAL)


def test_sigkill_mid_save_resumes_from_the_previous_checkpoint(uninterrupted, tmp_path):
    _, reference = uninterrupted
    runs = {}
    for phase in PHASES:  # all killed runs at once: real processes, each SIGKILLs itself inside the save of step 3
        out = tmp_path / phase
        out.mkdir()
        log = open(tmp_path / f"{phase}.log", "w")
        runs[phase] = subprocess.Popen([sys.executable, str(WORKER), str(out), *LOCAL], cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, env=_env(SID_TEST_KILL_IN_SAVE=f"{phase}:3"))
    for phase, process in runs.items():
        assert process.wait(timeout=240) == -signal.SIGKILL, (tmp_path / f"{phase}.log").read_text()[-3000:]
    for phase, kept in PHASES.items():
        root = tmp_path / phase / "checkpoints"
        latest = latest_checkpoint(root)
        assert latest.name == f"step-{kept:08d}", (phase, latest)
        verify(latest)  # complete and intact
        resumed = _in_process(tmp_path / phase, *LOCAL, "train.resume=true")
        assert sorted(resumed) == list(range(kept + 1, ITERATIONS + 1)), phase
        assert all(resumed[step] == reference[step] for step in resumed), (phase, resumed, reference)
        assert not list(root.glob(".tmp-*")) and not list(root.glob(".del-*")), phase  # leftovers cleaned


def test_saving_the_latest_step_again_never_removes_it(uninterrupted, tmp_path, monkeypatch):
    import shutil

    import sid_fast.checkpoint as checkpoint

    source, _ = uninterrupted
    out = tmp_path / "again"
    shutil.copytree(source / "checkpoints", out / "checkpoints")
    root = out / "checkpoints"
    assert latest_checkpoint(root).name == f"step-{ITERATIONS:08d}"

    class Died(BaseException):
        """Death at the worst moment: the new copy renamed into place, `latest` not yet moved."""

    def die(*args):
        raise Died

    monkeypatch.setattr(checkpoint, "_set_latest", die)
    with pytest.raises(Died):  # a resumed run that is already done saves its step again at the end
        _in_process(out, *LOCAL, "train.resume=true")
    verify(latest_checkpoint(root))  # still the old, complete step-6
    assert latest_checkpoint(root).name == f"step-{ITERATIONS:08d}"
    monkeypatch.undo()
    _in_process(out, *LOCAL, "train.resume=true")
    assert latest_checkpoint(root).name == f"step-{ITERATIONS:08d}.1"
    verify(latest_checkpoint(root))


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, quiet_libraries):
    """ENOSPC half-way through the second checkpoint's files: `sid-fast distill` stops with one line naming the
    checkpoint and the intact previous one (status 2), the partial files are removed, the API raises an OSError."""
    import sid_fast.engine.local as local
    from sid_fast.cli import main

    real_save = local.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if ".tmp-step-00000002" in str(path):  # the second checkpoint hits a full disk half-way through its files
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(local, "save_file", full_disk)
    out = tmp_path / "run"
    code = main(["distill", "--teacher.kind=sd3", "--teacher.preset=tiny", "--train.iterations=3", "--train.ckpt_every=1",
                 "--train.batch_size=2", "--train.progress=false", f"--train.out_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    root = out / "checkpoints"
    assert code == 2 and err[-1].startswith(f"sid-fast distill: error: {root}: could not write checkpoint "
                                            "step-00000002: No space left on device"), err[-3:]
    assert f"the previous checkpoint {root / 'step-00000001'} is intact" in err[-1]
    assert not any("Traceback" in line for line in err), err
    assert latest_checkpoint(root).name == "step-00000001"
    verify(root / "step-00000001")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # the partial one is gone


def _tiny_engine():
    from sid_fast.config import OptimConfig
    from sid_fast.engine.local import LocalEngine
    from sid_fast.models.mlp import VelocityMLP

    return LocalEngine(VelocityMLP(2, 8, 1), VelocityMLP(2, 8, 1), VelocityMLP(2, 8, 1), OptimConfig(), ema_decay=0.0)


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_save_full(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                       "file write failed")


@pytest.mark.parametrize("target,failure,reason", [
    ("save_file", _safetensors_full, "No space left on device"),  # as safetensors reports ENOSPC
    ("torch.save", _torch_save_full, "the write failed ([enforce fail"),  # as torch.save reports a failed write
])
def test_a_library_reporting_a_full_disk_is_a_checkpoint_write_error(tmp_path, monkeypatch, target, failure, reason):
    import sid_fast.engine.local as local
    from sid_fast.checkpoint import CheckpointWriteError, rng_state, save_checkpoint

    engine, rng, state = _tiny_engine(), rng_state(torch.Generator()), {"step": 1}
    save_checkpoint(tmp_path, 1, engine, state, rng)
    monkeypatch.setattr(local if target == "save_file" else local.torch, target.split(".")[-1], failure)
    with pytest.raises(CheckpointWriteError, match=f"could not write checkpoint step-00000002: {re.escape(reason)}"):
        save_checkpoint(tmp_path, 2, engine, state, rng)
    assert latest_checkpoint(tmp_path).name == "step-00000001" and not list(tmp_path.glob(".tmp-*"))
    verify(tmp_path / "step-00000001")


def test_other_errors_in_a_save_propagate_as_they_are(tmp_path, monkeypatch):
    """A bug inside the engine's save is not dressed up as a disk problem."""
    from sid_fast.checkpoint import rng_state, save_checkpoint

    engine = _tiny_engine()

    def bug(directory):
        raise RuntimeError("shape mismatch in some tensor")

    monkeypatch.setattr(engine, "save_state", bug)
    with pytest.raises(RuntimeError, match="^shape mismatch in some tensor$"):
        save_checkpoint(tmp_path, 1, engine, {"step": 1}, rng_state(torch.Generator()))
    assert latest_checkpoint(tmp_path) is None


@pytest.fixture
def shards(tmp_path) -> Path:
    from sid_fast.data import prepare_prompts
    from sid_fast.data.tiny import TinyPromptEncoder

    (tmp_path / "prompts.txt").write_text("".join(f"prompt number {i}\n" for i in range(24)))
    prepare_prompts(tmp_path / "prompts.txt", tmp_path / "shards", TinyPromptEncoder(), samples_per_shard=4,
                    batch_size=24, progress=False)
    return tmp_path / "shards"


def test_a_shard_deleted_while_streaming_is_bad_data_not_a_crash(shards):
    from sid_fast.data import BadDataError, ShardConditions, ShardManifest, ShardStream
    from sid_fast.data.loader import reader_shards
    from sid_fast.errors import is_user_error, one_line

    manifest = ShardManifest.load(shards)
    order = [manifest.shards[i]["name"] for i in reader_shards(len(manifest.shards), 0, 0, 0, 1)]
    stream = ShardStream(shards, shuffle_buffer=0, max_bad_fraction=0.5)
    samples = stream.iter_epoch()
    first = next(samples)
    (shards / order[2]).unlink()  # a shard the reader has not reached yet
    (shards / order[0]).unlink()  # the shard it is reading (its open handle still reads on POSIX)
    rest = list(samples)
    assert len(rest) + 1 == manifest.count - 4 and first["key"] not in {s["key"] for s in rest}
    assert stream.bad == {"missing_shard": 4} and stream.served == manifest.count - 4
    # past data.max_bad_fraction: BadDataError naming the shard, one line even through a DataLoader worker
    conditions = ShardConditions(shards, num_workers=1, shuffle_buffer=0, max_bad_fraction=0.01)
    with pytest.raises(BadDataError) as error:
        conditions.sample(manifest.count)
    conditions.close()
    line = one_line(error.value)
    assert is_user_error(error.value) and "DataLoader" not in line and "Traceback" not in line, line
    assert line.startswith(f"shard {shards / order[0]}: cannot open the shard (No such file or directory)"), line
    assert "data.max_bad_fraction=0.01" in line


_GLOO_RANK = """
import datetime, os, signal, sys, torch, torch.distributed as dist
from sid_fast.errors import lost_rank_error
rank, init, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)  # a patient rendezvous
group = dist.new_group(timeout=datetime.timedelta(seconds=float(os.environ["SID_FAST_DIST_TIMEOUT_S"])))
x = torch.ones(1 << 16)
try:
    for step in range(1, 40):
        if rank == 1 and step == 3:
            print(how, flush=True)
            os.kill(os.getpid(), getattr(signal, f"SIG{how}"))  # dies (KILL) or hangs (STOP) between collectives
        dist.all_reduce(x, group=group)
        x /= 2
except RuntimeError as error:
    lost = lost_rank_error(error)
    print(f"rank {rank}: {lost if lost is not None else error}", flush=True)
    sys.exit(1 if lost is not None else 3)
"""


def test_a_dead_or_hung_rank_is_named_within_the_timeout(tmp_path):
    """Two 2-rank gloo groups: in one rank 1 is SIGKILLed mid-run, in the other it stops answering (SIGSTOP). Rank 0
    exits in both, within the collective timeout (4 s) plus the check-in wait (2 s), naming rank 1."""
    env = _env(SID_FAST_DIST_TIMEOUT_S="4", SID_FAST_LOST_RANK_WAIT_S="2")
    runs = {how: [subprocess.Popen([sys.executable, "-c", _GLOO_RANK, str(rank), str(tmp_path / f"init-{how}"), how],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for rank in range(2)] for how in ("KILL", "STOP")}
    try:
        for how, (rank0, rank1) in runs.items():
            assert rank1.stdout.readline().strip() == how  # rank 1 is about to die or hang
            since = time.monotonic()
            out, _ = rank0.communicate(timeout=60)
            assert rank0.returncode == 1, (how, out)
            assert "rank 1 of 2 lost" in out and "did not answer within 2 s" in out, (how, out)
            assert time.monotonic() - since < 30, how
    finally:
        for process in (p for pair in runs.values() for p in pair):
            if process.poll() is None:
                process.kill()
            process.wait()


def test_zero3_rank_killed_mid_save_is_named_and_the_run_resumes(tmp_path):
    """Two DeepSpeed ZeRO-3 ranks started separately (as srun or two nodes would): rank 1 SIGKILLs itself inside
    the checkpoint save of step 3; rank 0 exits naming it instead of waiting; torchrun then resumes from step 2."""
    pytest.importorskip("deepspeed")
    from test_engine_zero3 import _rel, reference_run

    out = tmp_path / "run"
    out.mkdir()
    overrides = [f"train.iterations={ITERATIONS}", "train.ckpt_every=1"]
    port = free_port()
    ranks = []
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   SID_FAST_DIST_TIMEOUT_S="120", SID_FAST_LOST_RANK_WAIT_S="3", SID_TEST_KILL_IN_SAVE="engine:3:1")
        log = open(tmp_path / f"rank{rank}.log", "w")
        ranks.append(subprocess.Popen([sys.executable, str(WORKER), str(out), *overrides], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        assert ranks[1].wait(timeout=240) == -signal.SIGKILL, (tmp_path / "rank1.log").read_text()[-3000:]
        died = time.monotonic()
        assert ranks[0].wait(timeout=90) == 1, (tmp_path / "rank0.log").read_text()[-3000:]
        log0 = (tmp_path / "rank0.log").read_text()
        assert "rank 1 of 2 lost" in log0, log0[-3000:]
        assert time.monotonic() - died < 60
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    root = out / "checkpoints"
    assert latest_checkpoint(root).name == "step-00000002"
    verify(root / "step-00000002")
    resume = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                             str(WORKER), str(out), *overrides, "train.resume=true"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=240)
    assert resume.returncode == 0, (resume.stdout + resume.stderr)[-4000:]
    reference, _, _ = reference_run(2, ITERATIONS)
    for rank in range(2):
        resumed = _history(out, rank)
        assert sorted(resumed) == list(range(3, ITERATIONS + 1))
        for step, (loss_fake, loss_generator) in resumed.items():
            expected_fake, expected_generator = reference[rank][step - 1]
            assert _rel(loss_fake, expected_fake) < 1e-5 and _rel(loss_generator, expected_generator) < 1e-5, (rank, step)
