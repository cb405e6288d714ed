"""DeepSpeed ZeRO-3 engine on CPU/gloo: 2 processes match 1 process, memory halves, exact and resharded resume;
the same for the LoRA fake score that shares the teacher's partitioned base (teacher.fake_lora_rank > 0).

Each multi-process run is a real `torchrun` / `deepspeed` launch of tests/engine_worker.py (a tiny
teacher, fake score and generator, all three with parameters, so all three are partitioned). To keep the suite
short the LoRA runs ride in the same launches as the full-copy runs (`--then`: one launch, several runs):
- launch 1 (`two_rank_run`): the full-copy run, then a LoRA run (with gradient accumulation) SIGTERMed after its
  checkpoint of step 3;
- launch 2 (`sigterm_runs`): the full-copy run SIGTERMed after step 3; launch 3 resumes both killed runs, then runs
  a short SiD²ₐ run with the LoRA fake score as discriminator;
- the 1-rank universal resume launches resume a full-copy and a LoRA checkpoint; the tiny SD3 launch also runs SD3 +
  LoRA with activation checkpointing.
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

from engine_worker import BASE, TinyRealData, tiny_bundle  # noqa: E402
from ports import free_port  # noqa: E402

from sid_fast.api import init_student  # noqa: E402
from sid_fast.config import load_config  # noqa: E402
from sid_fast.engine.local import LocalEngine  # noqa: E402
from sid_fast.engine.planner import PlanOptions, plan, spec_from_module  # noqa: E402
from sid_fast.engine.sharded_ema import full_from_partitions, partition_of  # noqa: E402
from sid_fast.models.lora import make_lora_fake_score  # noqa: E402
from sid_fast.models.registry import build_teacher  # noqa: E402
from sid_fast.trainer import SiDTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "engine_worker.py"
BIN = Path(sys.executable).parent
ITERATIONS = 6
LORA_RANK = 4
LORA = [f"teacher.fake_lora_rank={LORA_RANK}", f"train.iterations={ITERATIONS}", "train.grad_accum=2",
        "train.ckpt_every=1", "train.keep_checkpoints=10"]
"""The LoRA run: adapters of rank 4 on every linear of the tiny teacher, two micro-batches per update."""
ADVERSARIAL = [f"teacher.fake_lora_rank={LORA_RANK}", "adversarial.enabled=true", "adversarial.generator_warmup_images=0",
               "adversarial.adversarial_from_images=0", "train.iterations=3"]
"""SiD²ₐ with the LoRA fake score as discriminator, adversarial terms on from the first iteration."""


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    return env


def launch(out: Path, nproc: int, *overrides: str, launcher: str = "torchrun", env: dict | None = None,
           wait: bool = True):
    """Start the worker under `launcher` with `nproc` processes; returns the CompletedProcess or Popen."""
    port = free_port()
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}"]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}"]
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


def step_log(out: Path, rank: int, name: str = "steps") -> list[dict]:
    """The worker's per-iteration log (steps-rank{r}.jsonl or probe-rank{r}.jsonl), written as the run goes."""
    file = out / f"{name}-rank{rank}.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def kill_after(process, out: Path, step: int, ready=lambda: True, timeout: float = 180) -> int:
    """SIGTERM the launch's process group once `out`'s latest checkpoint is at least `step` (and `ready()`); the
    step of the latest checkpoint left."""
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and not (ready() and latest.is_file() and latest.read_text().strip() >= f"step-{step:08d}"):
        assert process.poll() is None, (out.parent / f"{out.name}.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    return int(latest.read_text().strip().split("-")[1])


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
    accum = config.train.grad_accum
    bundle = tiny_bundle() if config.teacher.kind == "mixture" else build_teacher(config.teacher)
    fake_score, generator = init_student(bundle.teacher, bundle.student)
    if config.teacher.fake_lora_rank:  # as build_engine makes it (same random adapter initialisation)
        fake_score = make_lora_fake_score(bundle.teacher.requires_grad_(False), config.teacher.fake_lora_rank)
    engine = LocalEngine(bundle.teacher, fake_score, generator, config.optim, grad_accum=world * accum,
                         ema_decay=config.train.ema_decay)
    if config.adversarial.enabled:
        from sid_fast.adversarial import DataAidedTrainer

        trainers = [DataAidedTrainer(config, _RankView(engine, rank), bundle.conditions, bundle.sample_shape,
                                     TinyRealData(rank)) for rank in range(world)]
    else:
        trainers = [SiDTrainer(config, _RankView(engine, rank), bundle.conditions, bundle.sample_shape)
                    for rank in range(world)]
    losses: dict[int, list] = {rank: [] for rank in range(world)}
    for step in range(iterations):
        steps_run = trainers[0].steps_for_iteration(step)
        fake = []
        for trainer in trainers:  # §3: one fake-score update from all ranks' micro-batches ...
            total = 0.0
            for _ in range(accum):
                loss = trainer.fake_score_loss(steps_run)
                engine.backward("fake_score", loss)
                engine.step("fake_score")
                total += loss.item() / accum
            fake.append(total)
        for rank, trainer in enumerate(trainers):  # ... then one generator update
            total = 0.0
            for _ in range(accum):
                loss = trainer.generator_loss(steps_run)
                engine.backward("generator", loss)
                engine.step("generator")
                total += loss.item() / accum
            losses[rank].append((fake[rank], total))
        engine.ema_update()
    return losses, engine.generator_state_dict(ema=False), engine.generator_state_dict(ema=True)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """The uninterrupted full-copy run (6 iterations), then in the same processes the LoRA run, SIGTERMed once its
    checkpoint of step 3 is written (it resumes in `sigterm_runs`)."""
    out = tmp_path_factory.mktemp("zero3") / "run2"
    out.mkdir()
    lora = out.parent / "lora"
    process = launch(out, 2, f"train.iterations={ITERATIONS}", "train.ckpt_every=3", "train.keep_checkpoints=3",
                     "--then", str(lora), *LORA, "--slow-after=3", wait=False)
    full_done = lambda: (out / "generator_ema.safetensors").is_file()  # noqa: E731
    lora_stopped_at = kill_after(process, lora, 3, ready=full_done)
    assert full_done() and all((out / f"history-rank{rank}.json").is_file() for rank in range(2))
    (lora / "stopped_at").write_text(str(lora_stopped_at))
    return out


@pytest.fixture(scope="module")
def sigterm_runs(two_rank_run):
    """The full-copy run SIGTERMed after step 3; then one launch resumes it and the LoRA run to 6 iterations and runs
    the SiD²ₐ LoRA run. Returns {name: (directory, step it was stopped at)}."""
    root = two_rank_run.parent
    killed, lora, adversarial = root / "killed", root / "lora", root / "lora_adversarial"
    killed.mkdir()
    process = launch(killed, 2, f"train.iterations={ITERATIONS}", "train.ckpt_every=1", "--slow-after=3", wait=False)
    stopped_at = kill_after(process, killed, 3)
    launch(killed, 2, f"train.iterations={ITERATIONS}", "train.ckpt_every=1", "train.resume=true",
           "--then", str(lora), *LORA, "train.resume=true", "--then", str(adversarial), *ADVERSARIAL)
    return {"killed": (killed, stopped_at), "lora": (lora, int((lora / "stopped_at").read_text())),
            "adversarial": (adversarial, 0)}


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
    method's learning rate (§6). Then, in the same launch, SD3 with the LoRA fake score (adapters on the attention
    projections) and activation checkpointing of all three networks (teacher and fake score recomputed through the
    shared base in the generator's backward) against the 1-process LoRA run without checkpointing."""
    overrides = ["teacher.kind=sd3", "teacher.preset=tiny", "train.batch_size=2", "train.iterations=5",
                 "optim.lr_generator=5e-6", "optim.lr_fake=5e-6"]
    # The generator loss is linear in the fake score's distance to the teacher: after 5e-6 steps of a rank-2 LoRA it
    # sits at the rounding level of the two forwards (1e-7 of the outputs), so the adapters step at 1e-2; and the
    # generator at 1e-7, since Adam with β1 = 0 turns rounding-level gradient differences into whole-step weight
    # differences that this larger loss would show (the full-copy run above checks the generator's training).
    lora_overrides = [*overrides, "teacher.fake_lora_rank=2", "optim.lr_fake=1e-2", "optim.lr_generator=1e-7",
                      "train.iterations=3"]
    out, lora = tmp_path / "sd3", tmp_path / "sd3_lora"
    out.mkdir()
    launch(out, 2, *overrides, "--then", str(lora), *lora_overrides, "engine.activation_checkpointing=true")
    initial = build_teacher(load_config(None, overrides).teacher).teacher.state_dict()
    for run, run_overrides, iterations in ((out, overrides, 5), (lora, lora_overrides, 3)):
        reference, reference_weights, _ = reference_run(2, iterations, *run_overrides)
        for rank in range(2):
            got = history(run, rank)
            for step, (loss_fake, loss_gen) in enumerate(reference[rank], start=1):
                assert _rel(got[step]["loss_fake"], loss_fake) < 1e-5, (run.name, rank, step, got[step], loss_fake)
                assert _rel(got[step]["loss_generator"], loss_gen) < 1e-5, (run.name, rank, step, got[step], loss_gen)
        weights = load_file(run / "generator.safetensors")
        moved = 0.0
        for name, value in reference_weights.items():
            scale = value.abs().max().clamp_min(1e-12)
            assert (weights[name] - value).abs().max() / scale < 1e-5, (run.name, name)
            moved = max(moved, float((value - initial[name]).abs().max() / scale))
        assert moved > (1e-4 if run == out else 1e-7), "the generator did not train: the comparison would be empty"
    for rank in range(2):  # the adapters trained (through the recomputed blocks) and never reached the teacher
        probe = step_log(lora, rank, "probe")
        assert len(probe) == 4 and all(r["teacher_equals_disabled_fake"] and r["teacher_unchanged"] for r in probe)
        assert probe[0]["fake_minus_teacher"] == 0 and probe[-1]["fake_minus_teacher"] > 1e-3


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


def test_sigterm_then_resume_matches_uninterrupted(two_rank_run, sigterm_runs):
    out, stopped_at = sigterm_runs["killed"]
    assert 3 <= stopped_at < ITERATIONS, f"the run was not interrupted mid-training (latest: step {stopped_at})"
    for rank in range(2):
        resumed, uninterrupted = history(out, rank), history(two_rank_run, rank)
        assert sorted(resumed) == list(range(stopped_at + 1, ITERATIONS + 1))
        for step, record in resumed.items():
            for key in ("loss_fake", "loss_generator"):
                assert _rel(record[key], uninterrupted[step][key]) < 1e-6, (rank, step, key)


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run, sigterm_runs, tmp_path):
    """A 2-rank checkpoint resumed on 1 rank through DeepSpeed's universal checkpoint: the full-copy run's, then (same
    launch) the LoRA run's, whose checkpoint holds the adapters only (the base is the teacher's, rebuilt)."""
    lora, _ = sigterm_runs["lora"]
    runs = {"one": two_rank_run, "one_lora": lora}
    for name, source in runs.items():
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(source / "checkpoints" / "step-00000003", tmp_path / name / "checkpoints" / "step-00000003")
        (tmp_path / name / "checkpoints" / "latest").write_text("step-00000003")
    launch(tmp_path / "one", 1, "train.iterations=4", "train.resume=true",
           "--then", str(tmp_path / "one_lora"), *LORA, "train.iterations=4", "train.resume=true", launcher="deepspeed")
    one, two = history(tmp_path / "one", 0), history(two_rank_run, 0)
    assert sorted(one) == [4]
    # the next fake-score loss depends only on restored weights and rank 0's restored random stream
    assert _rel(one[4]["loss_fake"], two[4]["loss_fake"]) < 1e-6, (one[4], two[4])
    memory = json.loads((tmp_path / "one" / "memory-rank0.json").read_text())
    full = sum(p.numel() * p.element_size() for p in tiny_bundle().teacher.parameters())
    assert memory["world_size"] == 1 and memory["generator"] == full
    # LoRA: the same, and the restored adapters are those of the 2-rank run (the fake score is not the teacher)
    one_lora = history(tmp_path / "one_lora", 0)
    two_lora = {r["step"]: r for r in step_log(lora, 0)}
    assert sorted(one_lora) == [4]
    assert _rel(one_lora[4]["loss_fake"], two_lora[4]["loss_fake"]) < 1e-6, (one_lora[4], two_lora[4])
    probe = step_log(tmp_path / "one_lora", 0, "probe")
    assert probe[0]["step"] == 3 and probe[0]["fake_minus_teacher"] > 0 and probe[0]["teacher_equals_disabled_fake"]
    # DeepSpeed's own model-states file, written by this test's run (plain containers and tensors: no pickle needed)
    states = tmp_path / "one_lora" / "checkpoints" / "step-00000003" / "fake_score"
    states = states / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    saved = torch.load(states, map_location="cpu", weights_only=True)
    assert not saved.get("frozen_param_fragments") and all("lora_" in name for name in saved["param_shapes"][0]), \
        "the LoRA fake score's checkpoint must hold the adapters only (the base is the teacher's)"


# ---------------------------------------------------------------- LoRA fake score on a shared partitioned base


def _lora_losses(out: Path, rank: int) -> dict[int, dict]:
    """Per-iteration losses of the LoRA run: the killed part's, then the resumed run's (which win where both ran
    an iteration: the killed process may have finished one past its last checkpoint)."""
    return {record["step"]: record for record in step_log(out, rank)}


def test_lora_two_ranks_match_one_process_through_sigterm_and_resume(sigterm_runs):
    """2-rank ZeRO-3 with the LoRA fake score (gradient accumulation 2), SIGTERMed after step 3 and resumed, against
    the 1-process local engine on the same batches: losses of both ranks over 6 iterations, final generator weights
    and EMA within 1e-5; where the killed run finished an iteration the resumed run redid, the two agree to 1e-6."""
    lora, stopped_at = sigterm_runs["lora"]
    assert 3 <= stopped_at < ITERATIONS, f"the LoRA run was not interrupted mid-training (latest: step {stopped_at})"
    reference, reference_weights, reference_ema = reference_run(2, ITERATIONS, *LORA)
    for rank in range(2):
        log = step_log(lora, rank)
        merged = _lora_losses(lora, rank)
        assert sorted(merged) == list(range(1, ITERATIONS + 1)), sorted(merged)
        assert sorted(history(lora, rank)) == list(range(stopped_at + 1, ITERATIONS + 1))
        for step, (loss_fake, loss_gen) in enumerate(reference[rank], start=1):
            assert _rel(merged[step]["loss_fake"], loss_fake) < 1e-5, (rank, step, merged[step], loss_fake)
            assert _rel(merged[step]["loss_generator"], loss_gen) < 1e-5, (rank, step, merged[step], loss_gen)
        for step in range(stopped_at + 1, ITERATIONS + 1):
            before = [r for r in log if r["step"] == step]
            if len(before) == 2:  # run before the kill and again after the resume
                for key in ("loss_fake", "loss_generator"):
                    assert _rel(before[0][key], before[1][key]) < 1e-6, (rank, step, key)
    weights, ema = load_file(lora / "generator.safetensors"), load_file(lora / "generator_ema.safetensors")
    initial = tiny_bundle().student.state_dict()
    for name, value in reference_weights.items():
        scale = value.abs().max()
        assert (weights[name] - value).abs().max() / scale < 1e-5, name
        assert (value - initial[name]).abs().max() / scale > 1e-3, f"{name} did not train: the check would be empty"
        assert (ema[name] - reference_ema[name]).abs().max() / scale < 1e-5, name


def test_lora_memory_per_rank_equals_the_plan(sigterm_runs):
    """Per-rank bytes of the resumed LoRA run, by kind, against the planner's figures for the tiny model on 2 GPUs in
    fp32: the teacher's partitions are the one base; the fake score holds its adapters' weights, gradients, fp32
    master and Adam moments only; up to ZeRO-3's padding (at most one element per tensor and rank)."""
    lora, _ = sigterm_runs["lora"]
    bundle = tiny_bundle()
    spec = spec_from_module(bundle.teacher, "tiny", hidden=48, blocks=2, text_tokens=0, latent_factor=1)
    planned = plan(spec, PlanOptions(gpus_per_node=2, precision="fp32", lora_fake_rank=LORA_RANK))
    fake = make_lora_fake_score(bundle.teacher, LORA_RANK)
    base_tensors = sum(1 for _ in bundle.teacher.parameters())
    adapter_tensors = sum(1 for name, _ in fake.named_parameters() if "lora_" in name)
    kinds = {"parameters": ("weights", 4), "gradients": ("gradients", 4), "master": ("master", 4),
             "optimizer": ("optimizer", 8)}
    for rank in range(2):
        memory = json.loads((lora / f"memory-rank{rank}.json").read_text())
        parts = memory["parts"]
        assert planned["teacher_params"] <= parts["teacher"]["parameters"] <= planned["teacher_params"] + 4 * base_tensors
        assert memory["fake_score"] == parts["fake_score"]["parameters"] < memory["teacher"] / 4  # adapters only
        measured_total = parts["teacher"]["parameters"]
        for network, tensors in (("fake_score", adapter_tensors), ("generator", base_tensors)):
            for kind, (planned_kind, size) in kinds.items():
                expected = planned[f"{network}_parts"][planned_kind]
                assert expected <= parts[network][kind] <= expected + size * tensors, (rank, network, kind)
                measured_total += parts[network][kind]
            assert memory[f"{network}_model_states"] == sum(parts[network][k] for k in ("parameters", "master", "optimizer"))
        # the plan's model states for this config: teacher + fake score + generator, without the gathered-layer term
        expected_total = planned["teacher_params"] + planned["fake_score_states"] + planned["generator_states"] - \
            planned["generator_parts"]["gathered"]
        assert expected_total <= measured_total <= expected_total + 24 * (2 * base_tensors + adapter_tensors), rank
        assert planned["fake_score_states"] < planned["generator_states"] / 5


def test_lora_adapters_never_leak_into_the_teacher(sigterm_runs):
    """At every step, in the killed and the resumed process: the teacher's output equals the fake score's with its
    adapters disabled bit for bit and never changes; the fake score starts as the teacher and moves away from it."""
    lora, _ = sigterm_runs["lora"]
    for rank in range(2):
        probe = step_log(lora, rank, "probe")
        assert {r["step"] for r in probe} == set(range(ITERATIONS + 1)), [r["step"] for r in probe]
        assert all(r["teacher_equals_disabled_fake"] and r["teacher_unchanged"] for r in probe), probe
        assert len({r["teacher_sum"] for r in probe}) == 1, "the teacher changed across the resume"
        assert probe[0]["step"] == 0 and probe[0]["fake_minus_teacher"] == 0.0  # B = 0: the fake starts as the teacher
        assert probe[-1]["fake_minus_teacher"] > 1e-4
        assert {r["trainable_tensors"] for r in probe} == {6}  # adapters only; disabling them restored the flags


def test_lora_fake_score_as_sid2a_discriminator(sigterm_runs):
    """SiD²ₐ with the LoRA fake score as discriminator (feature hook on the fake score's tree, adversarial terms
    from the first iteration), 2 ranks against 1 process on the same batches and real samples."""
    out, _ = sigterm_runs["adversarial"]
    reference, reference_weights, _ = reference_run(2, 3, *ADVERSARIAL)
    for rank in range(2):
        got = history(out, rank)
        assert all("loss_d" in got[step] and "loss_adv" in got[step] for step in got)
        for step, (loss_fake, loss_gen) in enumerate(reference[rank], start=1):
            assert _rel(got[step]["loss_fake"], loss_fake) < 1e-5, (rank, step, got[step], loss_fake)
            assert _rel(got[step]["loss_generator"], loss_gen) < 1e-5, (rank, step, got[step], loss_gen)
    weights = load_file(out / "generator.safetensors")
    for name, value in reference_weights.items():
        assert (weights[name] - value).abs().max() / value.abs().max() < 1e-5, name


@pytest.mark.parametrize("numel,world", [(7, 2), (12, 3), (5, 8), (1, 1)])
def test_partition_roundtrip(numel, world):
    """Resharding of EMA partitions: cut into `world` padded ZeRO-3 partitions and back, then onto 3 ranks."""
    full = torch.randn(numel)
    parts = [partition_of(full, rank, world) for rank in range(world)]
    assert len({p.numel() for p in parts}) == 1 and parts[0].numel() == -(-numel // world)
    assert torch.equal(full_from_partitions(parts, numel, full.shape), full)
    again = [partition_of(full_from_partitions(parts, numel, full.shape), rank, 3) for rank in range(3)]
    assert torch.equal(full_from_partitions(again, numel, full.shape), full)
