"""Worker for the multi-process engine tests (run under torchrun / the deepspeed launcher, or plainly).

A tiny DiT stand-in: teacher, fake score and generator are VelocityMLPs with parameters, so ZeRO-3 really
partitions all three. Writes history-rank{r}.json, memory-rank{r}.json and (rank 0) generator.safetensors and generator_ema.safetensors.

    torchrun --nproc_per_node 2 tests/engine_worker.py OUT [--section.field=value ...]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from sid_fast.config import load_config
from sid_fast.models.mixture import LabelConditions
from sid_fast.models.mlp import VelocityMLP
from sid_fast.models.registry import TeacherBundle

DIM, CLASSES = 6, 3

BASE = [
    "engine.kind=deepspeed", "engine.persistence_threshold=0", "engine.optimizer=torch",
    "method.num_steps=2", "train.batch_size=8", "train.iterations=6", "train.log_every=1",
    "train.progress=false", "train.resume=false", "optim.lr_generator=1e-3", "optim.lr_fake=1e-3",
    "optim.grad_clip=0.0", "train.ema_decay=0.9",
]


def tiny_bundle(hidden: int = 48) -> TeacherBundle:
    """Deterministic tiny teacher (with parameters) and student; identical on every rank."""
    torch.manual_seed(1234)
    teacher = VelocityMLP(DIM, hidden=hidden, depth=2, num_classes=CLASSES, time_dim=16)
    student = VelocityMLP(DIM, hidden=hidden, depth=2, num_classes=CLASSES, time_dim=16)
    with torch.no_grad():  # the student starts near the teacher, as a real student copy would
        for p_student, p_teacher in zip(student.parameters(), teacher.parameters()):
            p_student.copy_(p_teacher + 0.05 * torch.randn_like(p_teacher))
    return TeacherBundle(teacher, student, LabelConditions(CLASSES), (DIM,))


def main(argv: list[str]) -> None:
    from safetensors.torch import save_file

    from sid_fast.engine.build import build_engine
    from sid_fast.trainer import SiDTrainer

    torch.set_flush_denormal(True)
    out = Path(argv[0])
    config = load_config(None, BASE + [f"train.out_dir={out}"] + argv[1:])
    if config.teacher.kind == "mixture":
        bundle = tiny_bundle(int(os.environ.get("SID_TEST_HIDDEN", "48")))
    else:  # a real DiT family built in code (e.g. teacher.kind=sd3 teacher.preset=tiny)
        from sid_fast.models.registry import build_teacher

        bundle = build_teacher(config.teacher)
    engine = build_engine(config, bundle)
    rank = engine.rank
    def held(name: str) -> int:  # bytes of parameters this rank holds (the local engine holds everything)
        if hasattr(engine, "parameter_bytes"):
            return engine.parameter_bytes(name)
        return sum(p.numel() * p.element_size() for p in getattr(engine, name).parameters())

    memory = {name: held(name) for name in ("teacher", "fake_score", "generator")}
    trainer = SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)
    slow_after = int(os.environ.get("SID_TEST_SLOW_AFTER", "-1"))
    step_fn = trainer.train_step

    step_seconds: list[float] = []

    def train_step():  # timed; and lets the SIGTERM test catch the run between checkpoints
        begin = time.perf_counter()
        stats = step_fn()
        step_seconds.append(time.perf_counter() - begin)
        if 0 <= slow_after <= trainer.step:
            time.sleep(1.0)
        return stats

    trainer.train_step = train_step
    start = time.perf_counter()
    history = trainer.fit()
    elapsed = time.perf_counter() - start
    state = engine.generator_state_dict(ema=False)
    ema_state = engine.generator_state_dict(ema=True) if config.train.ema_decay > 0 else None
    if hasattr(engine, "model_state_bytes"):
        memory.update({f"{name}_model_states": engine.model_state_bytes(name) for name in ("fake_score", "generator")})
    memory["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory["fit_seconds"] = elapsed
    memory["step_seconds_median"] = sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None
    memory["world_size"] = engine.world_size
    (out / f"history-rank{rank}.json").write_text(json.dumps(history))
    (out / f"memory-rank{rank}.json").write_text(json.dumps(memory))
    if rank == 0:
        save_file(state, out / "generator.safetensors")
        if ema_state is not None:
            save_file(ema_state, out / "generator_ema.safetensors")
    engine.barrier()


if __name__ == "__main__":
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    main([arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")])
