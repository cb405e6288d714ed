"""DeepSpeed ZeRO-3 engine on CPU/gloo: 2 processes match 1 process, memory halves, exact and resharded resume.

Each multi-process run is a real `torchrun` / `deepspeed` launch of tests/engine_worker.py (a tiny
teacher, fake score and generator, all three with parameters, so all three are partitioned).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from engine_worker import BASE, tiny_bundle  # noqa: E402

from sid_fast.api import init_student  # noqa: E402
from sid_fast.config import load_config  # noqa: E402
from sid_fast.engine.local import LocalEngine  # noqa: E402
from sid_fast.engine.planner import PlanOptions, plan, spec_from_module  # noqa: E402
from sid_fast.engine.sharded_ema import full_from_partitions, partition_of  # noqa: E402
from sid_fast.models.registry import build_teacher  # noqa: E402
from sid_fast.trainer import SiDTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "engine_worker.py"
BIN = Path(sys.executable).parent
ITERATIONS = 6
_port = [29700 + os.getpid() % 500]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    return env


def launch(out: Path, nproc: int, *overrides: str, launcher: str = "torchrun", env: dict | None = None,
           wait: bool = True):
    """Start the worker under `launcher` with `nproc` processes; returns the CompletedProcess or Popen."""
    _port[0] += 1
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={_port[0]}"]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={_port[0]}"]
    else:  # plain python: a 1-process group
        cmd = [sys.executable]
    cmd += [str(WORKER), str(out), *overrides]
    log = open(out.parent / f"{out.name}.log", "w")
    process = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    if not wait:
        return process
    code = process.wait(timeout=240)
    assert code == 0, f"{' '.join(cmd)} failed ({code}):\n" + (out.parent / f"{out.name}.log").read_text()[-4000:]
    return process


def history(out: Path, rank: int) -> dict[int, dict]:
    return {record["step"]: record for record in json.loads((out / f"history-rank{rank}.json").read_text())}


class _RankView:
    """The local engine seen as rank `rank`, so a trainer draws that rank's random stream."""

    def __init__(self, engine, rank: int):
        self._engine, self.rank = engine, rank

    def __getattr__(self, name):
        return getattr(self._engine, name)


def reference_run(world: int, iterations: int, *overrides: str) -> tuple[dict[int, list[tuple[float, float]]], dict, dict]:
    """1 process doing what `world` data-parallel ranks do: every rank's micro-batch, gradients averaged.
    Runs single-threaded like the workers (OMP_NUM_THREADS=1), so reductions round the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(world, iterations, *overrides)
    finally:
        torch.set_num_threads(threads)


def _reference_run(world: int, iterations: int, *overrides: str) -> tuple[dict[int, list[tuple[float, float]]], dict, dict]:
    config = load_config(None, BASE + ["engine.kind=local", "train.out_dir=/nonexistent", *overrides])
    bundle = tiny_bundle() if config.teacher.kind == "mixture" else build_teacher(config.teacher)
    fake_score, generator = init_student(bundle.teacher, bundle.student)
    engine = LocalEngine(bundle.teacher, fake_score, generator, config.optim, grad_accum=world,
                         ema_decay=config.train.ema_decay)
    trainers = [SiDTrainer(config, _RankView(engine, rank), bundle.conditions, bundle.sample_shape) for rank in range(world)]
    losses: dict[int, list] = {rank: [] for rank in range(world)}
    for step in range(iterations):
        steps_run = trainers[0].steps_for_iteration(step)
        fake = []
        for trainer in trainers:  # §3: one fake-score update from all ranks' batches ...
            loss = trainer.fake_score_loss(steps_run)
            engine.backward("fake_score", loss)
            engine.step("fake_score")
            fake.append(loss.item())
        for rank, trainer in enumerate(trainers):  # ... then one generator update
            loss = trainer.generator_loss(steps_run)
            engine.backward("generator", loss)
            engine.step("generator")
            losses[rank].append((fake[rank], loss.item()))
        engine.ema_update()
    return losses, engine.generator_state_dict(ema=False), engine.generator_state_dict(ema=True)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "run2"
    out.mkdir()
    launch(out, 2, f"train.iterations={ITERATIONS}", "train.ckpt_every=3", "train.keep_checkpoints=3")
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_two_ranks_match_one_process(two_rank_run):
    reference, reference_weights, reference_ema = reference_run(2, ITERATIONS)
    for rank in range(2):
        got = history(two_rank_run, rank)
        assert sorted(got) == list(range(1, ITERATIONS + 1))
        for step, (loss_fake, loss_gen) in enumerate(reference[rank], start=1):
            assert _rel(got[step]["loss_fake"], loss_fake) < 1e-5, (rank, step, got[step], loss_fake)
            assert _rel(got[step]["loss_generator"], loss_gen) < 1e-5, (rank, step, got[step], loss_gen)
    weights = load_file(two_rank_run / "generator.safetensors")
    initial = tiny_bundle().student.state_dict()
    assert set(weights) == set(reference_weights)
    for name, value in reference_weights.items():
        scale = value.abs().max()
        assert (weights[name] - value).abs().max() / scale < 1e-5, name
        assert (value - initial[name]).abs().max() / scale > 1e-3, f"{name} did not train: the check would be empty"
    # the sharded EMA (each rank its own partition) equals the 1-process full EMA
    ema = load_file(two_rank_run / "generator_ema.safetensors")
    for name, value in reference_ema.items():
        assert (ema[name] - value).abs().max() / value.abs().max() < 1e-5, name
        assert (value - reference_weights[name]).abs().max() / value.abs().max() > 1e-4, f"EMA of {name} equals the weights"


def test_tiny_sd3_dit_two_ranks_match_one_process(tmp_path):
    """The same on a diffusers SD3Transformer2DModel (joint attention, adaLN) built in code, with CFG, at the
    method's learning rate (§6)."""
    overrides = ["teacher.kind=sd3", "teacher.preset=tiny", "train.batch_size=2", "train.iterations=5",
                 "optim.lr_generator=5e-6", "optim.lr_fake=5e-6"]
    out = tmp_path / "sd3"
    out.mkdir()
    launch(out, 2, *overrides)
    reference, reference_weights, _ = reference_run(2, 5, *overrides)
    for rank in range(2):
        got = history(out, rank)
        for step, (loss_fake, loss_gen) in enumerate(reference[rank], start=1):
            assert _rel(got[step]["loss_fake"], loss_fake) < 1e-5, (rank, step, got[step], loss_fake)
            assert _rel(got[step]["loss_generator"], loss_gen) < 1e-5, (rank, step, got[step], loss_gen)
    weights = load_file(out / "generator.safetensors")
    initial = build_teacher(load_config(None, overrides).teacher).teacher.state_dict()
    moved = 0.0
    for name, value in reference_weights.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert (weights[name] - value).abs().max() / scale < 1e-5, name
        moved = max(moved, float((value - initial[name]).abs().max() / scale))
    assert moved > 1e-4, "the generator did not train: the comparison would be empty"


def test_per_rank_parameter_memory_halves(two_rank_run):
    bundle = tiny_bundle()
    full = sum(p.numel() * p.element_size() for p in bundle.teacher.parameters())
    count = sum(1 for _ in bundle.teacher.parameters())
    for rank in range(2):
        memory = json.loads((two_rank_run / f"memory-rank{rank}.json").read_text())
        for name in ("teacher", "fake_score", "generator"):
            # each parameter contributes ceil(numel / 2) elements: half, plus at most one padding element each
            assert full / 2 <= memory[name] <= full / 2 + 4 * count, (name, memory[name], full)
    # the planner's fp32 teacher term (4 bytes / parameter / GPU) is what a rank measured, up to padding
    spec = spec_from_module(bundle.teacher, "tiny", hidden=48, blocks=2, text_tokens=0, latent_factor=1)
    predicted = plan(spec, PlanOptions(gpus_per_node=2, precision="fp32"))["teacher_params"]
    assert predicted <= memory["teacher"] <= predicted + 4 * count


def test_sigterm_then_resume_matches_uninterrupted(two_rank_run, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    process = launch(out, 2, f"train.iterations={ITERATIONS}", "train.ckpt_every=1", wait=False,
                     env=_env(SID_TEST_SLOW_AFTER="3"))
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= "step-00000003"):
        assert process.poll() is None, (out.parent / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    stopped_at = int(latest.read_text().strip().split("-")[1])
    assert 3 <= stopped_at < ITERATIONS, f"the run was not interrupted mid-training (latest: step {stopped_at})"
    launch(out, 2, f"train.iterations={ITERATIONS}", "train.ckpt_every=1", "train.resume=true")
    for rank in range(2):
        resumed, uninterrupted = history(out, rank), history(two_rank_run, rank)
        assert sorted(resumed) == list(range(stopped_at + 1, ITERATIONS + 1))
        for step, record in resumed.items():
            for key in ("loss_fake", "loss_generator"):
                assert _rel(record[key], uninterrupted[step][key]) < 1e-6, (rank, step, key)


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run, tmp_path):
    out = tmp_path / "one"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_rank_run / "checkpoints" / "step-00000003", out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "latest").write_text("step-00000003")
    launch(out, 1, "train.iterations=4", "train.resume=true", launcher="deepspeed")
    one, two = history(out, 0), history(two_rank_run, 0)
    assert sorted(one) == [4]
    # the next fake-score loss depends only on restored weights and rank 0's restored random stream
    assert _rel(one[4]["loss_fake"], two[4]["loss_fake"]) < 1e-6, (one[4], two[4])
    memory = json.loads((out / "memory-rank0.json").read_text())
    full = sum(p.numel() * p.element_size() for p in tiny_bundle().teacher.parameters())
    assert memory["world_size"] == 1 and memory["generator"] == full


@pytest.mark.parametrize("numel,world", [(7, 2), (12, 3), (5, 8), (1, 1)])
def test_partition_roundtrip(numel, world):
    """Resharding of EMA partitions: cut into `world` padded ZeRO-3 partitions and back, then onto 3 ranks."""
    full = torch.randn(numel)
    parts = [partition_of(full, rank, world) for rank in range(world)]
    assert len({p.numel() for p in parts}) == 1 and parts[0].numel() == -(-numel // world)
    assert torch.equal(full_from_partitions(parts, numel, full.shape), full)
    again = [partition_of(full_from_partitions(parts, numel, full.shape), rank, 3) for rank in range(3)]
    assert torch.equal(full_from_partitions(again, numel, full.shape), full)
