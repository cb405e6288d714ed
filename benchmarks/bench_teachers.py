"""Diffusers teachers (SD3, FLUX, SANA) at a tiny and a medium CPU size: the teacher's guided forward (κ = 4.5),
one SiD iteration (fake-score update + generator update, K = 4, κ1 = κ2 = κ4 = 4.5) and peak memory.

    ./run bench -k teachers                 pytest-benchmark (peak RSS in extra_info)
    python benchmarks/bench_teachers.py     the markdown tables of docs/teachers.md (`lora`: only the LoRA table)

Peak memory: a fresh child process imports everything (one tiny iteration to load lazily imported model code),
resets its resident-set high-water mark (Linux /proc/self/clear_refs), builds the preset (text encoders included) and runs 3 SiD iterations; reported is the
peak above the post-import resident set (models, optimizer state, activations; not the libraries).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from sid_fast.api import init_student
from sid_fast.config import MethodConfig, SiDConfig, TeacherConfig, TrainConfig
from sid_fast.engine import LocalEngine
from sid_fast.guidance import guided_velocity
from sid_fast.models.lora import make_lora_fake_score
from sid_fast.models.registry import build_teacher
from sid_fast.trainer import SiDTrainer

CASES = [(family, preset) for family in ("sd3", "flux", "sana") for preset in ("tiny", "medium")]
BATCH = {"tiny": 4, "medium": 2}


def make_trainer(family: str, preset: str, out_dir: str, lora_rank: int = 0) -> SiDTrainer:
    """SiD trainer on a built-in preset; `lora_rank` > 0 makes the fake score teacher + LoRA (shared weights)."""
    config = SiDConfig(teacher=TeacherConfig(kind=family, preset=preset),
                       method=MethodConfig(num_steps=4, kappa_fake_loss=4.5, kappa_fake_gen=4.5, kappa_teacher=4.5),
                       train=TrainConfig(batch_size=BATCH[preset], out_dir=out_dir, progress=False))
    bundle = build_teacher(config.teacher)
    fake_score, generator = init_student(bundle.teacher, None)
    if lora_rank:
        fake_score = make_lora_fake_score(bundle.teacher.requires_grad_(False), lora_rank)
    engine = LocalEngine(bundle.teacher, fake_score, generator, config.optim)
    return SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)


def teacher_forward_fn(trainer: SiDTrainer):
    """A closure running the teacher's CFG forward (κ = 4.5) on one batch, without grad."""
    cond, uncond = trainer._batch()
    x_t = torch.randn(len(cond), *trainer.sample_shape)
    t = torch.rand(len(cond))

    def forward():
        with torch.no_grad():
            return guided_velocity(trainer.engine.teacher, x_t, t, cond, uncond, 4.5)

    return forward


def _memory_mb() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, MB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def peak_memory_child(family: str, preset: str, lora_rank: int = 0) -> dict:
    """Run in a fresh process: warm up imports with the tiny preset, reset the peak mark, build `preset`,
    3 SiD iterations; MB above the reset."""
    import gc

    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as out:  # warm-up: diffusers/transformers import model code lazily
        make_trainer(family, "tiny", out).train_step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets VmHWM to the current RSS
        handle.write("5")
    baseline = _memory_mb()["VmRSS"]
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(family, preset, out, lora_rank)
        for _ in range(3):
            trainer.train_step()
    peak = _memory_mb()["VmHWM"]
    return {"baseline_mb": baseline, "peak_mb": peak, "peak_above_baseline_mb": peak - baseline}


def peak_memory(family: str, preset: str, lora_rank: int = 0) -> dict:
    here = str(Path(__file__).resolve().parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import bench_teachers as b; "
            f"print(json.dumps(b.peak_memory_child({family!r}, {preset!r}, {lora_rank})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def parameter_count(trainer: SiDTrainer) -> int:
    return sum(p.numel() for p in trainer.engine.teacher.parameters())


@pytest.mark.parametrize("family,preset", CASES)
def test_teacher_forward(benchmark, tmp_path, family, preset):
    trainer = make_trainer(family, preset, str(tmp_path))
    benchmark.pedantic(teacher_forward_fn(trainer), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(params=parameter_count(trainer), batch=BATCH[preset], latent=list(trainer.sample_shape))


@pytest.mark.parametrize("family,preset", CASES)
def test_sid_iteration(benchmark, tmp_path, family, preset):
    trainer = make_trainer(family, preset, str(tmp_path))
    benchmark.pedantic(trainer.train_step, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(params=parameter_count(trainer), batch=BATCH[preset], **peak_memory(family, preset))


def _median_seconds(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_flush_denormal(True)
    print("| family | preset | params | latent (C, h, w) | batch | teacher fwd κ=4.5 (ms) | SiD iteration (s) | peak RSS above imports (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for family, preset in CASES:
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(family, preset, out)
            forward = _median_seconds(teacher_forward_fn(trainer), 5)
            iteration = _median_seconds(trainer.train_step, 3)
            memory = peak_memory(family, preset)
            print(f"| {family} | {preset} | {parameter_count(trainer) / 1e6:.2f}M | {tuple(trainer.sample_shape)} | "
                  f"{BATCH[preset]} | {1000 * forward:.1f} | {iteration:.3f} | {memory['peak_above_baseline_mb']:.0f} |",
                  flush=True)


def fake_score_owned_mb(trainer: SiDTrainer) -> float:
    """Memory the fake score holds beyond the teacher between updates: its own weights (storage not shared with
    the teacher) and Adam moments, in MiB, measured on the live tensors (gradients are freed after each step)."""
    engine = trainer.engine
    teacher_storage = {p.untyped_storage().data_ptr() for p in engine.teacher.parameters()}
    owned = 0
    for p in engine.fake_score.parameters():
        if p.untyped_storage().data_ptr() not in teacher_storage:
            owned += p.numel() * p.element_size()
    for state in engine.optimizers["fake_score"].state.values():
        owned += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
    return owned / 2**20


def lora_table() -> None:
    torch.set_flush_denormal(True)
    print("| family | preset | fake score | trainable fake params | fake weights + Adam state (MB) | SiD iteration (s) |"
          " peak RSS above imports (MB) |")
    print("|---|---|---|---|---|---|---|")
    for family in ("sd3", "flux", "sana"):
        for rank in (0, 4):
            with tempfile.TemporaryDirectory() as out:
                trainer = make_trainer(family, "medium", out, rank)
                trainable = sum(p.numel() for p in trainer.engine.fake_score.parameters() if p.requires_grad)
                iteration = _median_seconds(trainer.train_step, 3)
                memory = peak_memory(family, "medium", rank)
                print(f"| {family} | medium | {f'LoRA rank {rank}' if rank else 'full copy'} | {trainable / 1e6:.3f}M | "
                      f"{fake_score_owned_mb(trainer):.1f} | {iteration:.3f} | {memory['peak_above_baseline_mb']:.0f} |",
                      flush=True)

if __name__ == "__main__":
    lora_table() if sys.argv[1:] == ["lora"] else (main(), print(), lora_table())
