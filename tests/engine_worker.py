"""Worker for the multi-process engine tests (run under torchrun / the deepspeed launcher, or plainly).

A tiny DiT stand-in: teacher, fake score and generator are VelocityMLPs with parameters, so ZeRO-3 really
partitions all three. Writes history-rank{r}.json, memory-rank{r}.json and (rank 0) generator.safetensors and generator_ema.safetensors.

    torchrun --nproc_per_node 2 tests/engine_worker.py OUT [--section.field=value ...] [--then OUT2 [...] ...]

`--then` starts another run in the same processes once the previous one has finished (one launch, several runs:
the launch and import cost is paid once). `--slow-after=N` in a run's arguments sleeps 1 s after each iteration from
N on (as SID_TEST_SLOW_AFTER does for every run), so that a test can SIGTERM it between checkpoints. Every run appends
steps-rank{r}.jsonl as it goes (losses of each iteration; survives a kill). With teacher.fake_lora_rank > 0 (the LoRA
fake score) a run also appends probe-rank{r}.jsonl: before its first iteration and after every iteration, the
teacher, the fake score with its adapters disabled (peft's switch) and the fake score on one fixed input.
adversarial.enabled=true runs SiD²ₐ (DataAidedTrainer) on `TinyRealData`, with the LoRA fake score when
teacher.fake_lora_rank > 0.

Fault injection for tests/test_faults.py (environment variables; the process kills or stops itself, for real):
    SID_TEST_KILL_IN_SAVE=PHASE:STEP[:RANK]   SIGKILL inside the checkpoint save of STEP (on RANK, default 0), at
        PHASE: engine (the engine's files written into the temporary directory), manifest (the temporary directory
        complete), renamed (renamed into place, `latest` not yet moved), prune (`latest` moved, old not pruned)
A lost peer (sid_fast.errors.lost_rank_error) ends the worker with status 1 and one line naming the lost rank.
"""

from __future__ import annotations

import json
import os
import resource
import signal
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


class TinyRealData:
    """Real samples for SiD²ₐ on the tiny model: x0 = a fixed mean per label + 0.3·noise, own stream per rank."""

    def __init__(self, rank: int = 0, seed: int = 77):
        self.means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(seed))
        self.rng = torch.Generator().manual_seed(seed + 1 + rank)

    def sample_with_latents(self, batch_size: int):
        from sid_fast.models.protocol import Conditioning

        labels = torch.randint(0, CLASSES, (batch_size,), generator=self.rng)
        x0 = self.means[labels] + 0.3 * torch.randn(batch_size, DIM, generator=self.rng)
        return x0, Conditioning(labels=labels)

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.rng.set_state(torch.tensor(state["rng"], dtype=torch.uint8))


def build_trainer(config, bundle, rank: int = 0, engine=None):
    """The engine (build_engine's, or `engine`) and the trainer of a worker run: SiD, or SiD²ₐ when
    adversarial.enabled (the LoRA fake score when teacher.fake_lora_rank > 0; build_data_aided_trainer makes full
    copies)."""
    from sid_fast.engine.build import build_engine
    from sid_fast.trainer import SiDTrainer

    if not config.adversarial.enabled:
        engine = engine if engine is not None else build_engine(config, bundle)
        return engine, SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)
    from sid_fast.adversarial import DataAidedTrainer
    from sid_fast.api import init_student

    if engine is None:
        fake_score, generator = init_student(bundle.teacher, bundle.student)
        if config.teacher.fake_lora_rank:
            from sid_fast.models.lora import make_lora_fake_score

            fake_score = make_lora_fake_score(bundle.teacher.requires_grad_(False), config.teacher.fake_lora_rank)
        engine = build_engine(config, bundle, fake_score, generator)
    return engine, DataAidedTrainer(config, engine, bundle.conditions, bundle.sample_shape, TinyRealData(rank))


def probe_input(bundle, batch: int = 5):
    """One fixed (x_t, t, cond), the same on every rank."""
    g = torch.Generator().manual_seed(4321)
    return (torch.randn((batch, *bundle.sample_shape), generator=g), torch.rand(batch, generator=g),
            bundle.conditions.sample(batch, g))


class LoRAProbe:
    """Teacher vs fake score with adapters disabled vs fake score, on `probe_input`; one line per call appended to
    `file` (all ranks call it together: under ZeRO-3 the forwards are collective)."""

    def __init__(self, engine, bundle, file: Path):
        self.engine, self.file = engine, file
        x_t, t, cond = probe_input(bundle)
        self.args = (x_t.to(engine.device), t.to(engine.device), cond.to(engine.device))
        self.first_teacher = None
        self.records: list[dict] = []

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        from sid_fast.models.lora import adapters_disabled

        teacher = self.engine.teacher(*self.args)
        with adapters_disabled(self.engine.fake_score):
            disabled = self.engine.fake_score(*self.args)
        fake = self.engine.fake_score(*self.args)
        if self.first_teacher is None:
            self.first_teacher = teacher.clone()
        self.records.append({"step": step, "teacher_equals_disabled_fake": bool(torch.equal(teacher, disabled)),
                             "teacher_unchanged": bool(torch.equal(teacher, self.first_teacher)),
                             "teacher_sum": float(teacher.double().sum()),
                             "fake_minus_teacher": float((fake - teacher).abs().max()),
                             "trainable_tensors": sum(p.requires_grad for p in self.engine.fake_score.parameters())})
        with open(self.file, "a") as log:
            log.write(json.dumps(self.records[-1]) + "\n")


def install_faults(engine, trainer) -> None:
    """The SID_TEST_KILL_IN_SAVE hook of the module docstring."""
    import sid_fast.checkpoint as checkpoint

    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    spec = os.environ.get("SID_TEST_KILL_IN_SAVE")
    if spec:
        phase, step, *rank = spec.split(":")
        if engine.rank == int(rank[0] if rank else 0):
            def at(function, before: bool):
                def wrapped(*args, **kwargs):
                    hit = trainer.step == int(step)
                    if hit and before:
                        die()
                    result = function(*args, **kwargs)
                    if hit:
                        die()
                    return result
                return wrapped

            if phase == "engine":
                engine.save_state = at(engine.save_state, before=False)
            elif phase == "manifest":
                checkpoint.write_manifest = at(checkpoint.write_manifest, before=False)
            elif phase == "renamed":
                checkpoint._set_latest = at(checkpoint._set_latest, before=True)
            elif phase == "prune":
                checkpoint._prune = at(checkpoint._prune, before=True)
            else:
                raise ValueError(f"SID_TEST_KILL_IN_SAVE: unknown phase {phase!r}")


def main(argv: list[str]) -> None:
    """Run each `OUT [overrides]` group of argv (separated by --then) in turn, in this process."""
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)
    for group in groups:
        run(group)


def run(argv: list[str]) -> None:
    from safetensors.torch import save_file

    torch.set_flush_denormal(True)
    slow_after = int(os.environ.get("SID_TEST_SLOW_AFTER", "-1"))
    for arg in [a for a in argv if a.startswith("--slow-after=")]:
        slow_after = int(arg.split("=", 1)[1])
        argv = [a for a in argv if a != arg]
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(None, BASE + [f"train.out_dir={out}"] + argv[1:])
    if config.teacher.kind == "mixture":
        bundle = tiny_bundle(int(os.environ.get("SID_TEST_HIDDEN", "48")))
    else:  # a real DiT family built in code (e.g. teacher.kind=sd3 teacher.preset=tiny)
        from sid_fast.models.registry import build_teacher

        bundle = build_teacher(config.teacher)
    rank = int(os.environ.get("RANK", "0"))
    engine, trainer = build_trainer(config, bundle, rank)
    rank = engine.rank
    def held(name: str) -> int:  # bytes of parameters this rank holds (the local engine holds everything)
        if hasattr(engine, "parameter_bytes"):
            return engine.parameter_bytes(name)
        return sum(p.numel() * p.element_size() for p in getattr(engine, name).parameters())

    memory = {name: held(name) for name in ("teacher", "fake_score", "generator")}
    step_fn = trainer._train_step  # what fit() calls (train_step() wraps it too)
    probe = LoRAProbe(engine, bundle, out / f"probe-rank{rank}.jsonl") if config.teacher.fake_lora_rank else None

    step_seconds: list[float] = []

    def train_step():  # timed, logged as it goes; and lets the SIGTERM test catch the run between checkpoints
        if probe is not None and not probe.records:
            probe(trainer.step)  # before the first iteration this process runs
        begin = time.perf_counter()
        stats = step_fn()
        step_seconds.append(time.perf_counter() - begin)
        if probe is not None:
            probe(trainer.step)
        done = stats.resolved()
        with open(out / f"steps-rank{rank}.jsonl", "a") as log:
            log.write(json.dumps({"step": done.step, "loss_fake": done.loss_fake,
                                  "loss_generator": done.loss_generator}) + "\n")
        if 0 <= slow_after <= trainer.step:
            time.sleep(1.0)
        return stats

    trainer._train_step = train_step
    install_faults(engine, trainer)
    start = time.perf_counter()
    try:
        history = trainer.fit()
    except Exception as error:
        from sid_fast.errors import lost_rank_error

        lost = lost_rank_error(error)
        if lost is None:
            raise
        print(f"engine_worker rank {rank}: error: {lost}", file=sys.stderr, flush=True)
        sys.exit(1)
    elapsed = time.perf_counter() - start
    state = engine.generator_state_dict(ema=False)
    ema_state = engine.generator_state_dict(ema=True) if config.train.ema_decay > 0 else None
    if hasattr(engine, "model_state_bytes"):
        memory.update({f"{name}_model_states": engine.model_state_bytes(name) for name in ("fake_score", "generator")})
    if hasattr(engine, "model_state_parts"):
        memory["parts"] = {name: engine.model_state_parts(name) for name in ("teacher", "fake_score", "generator")}
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
