"""Study (issue 14): is a LoRA fake score on the shared teacher base as good as the full fake-score copy?

On the shipped ShapesWorld teacher with the reference recipe (sid_fast/presets/shapes_sid.yaml + --set), the same
seeds, prompt shards and iterations for every arm, the arms differ only in teacher.fake_lora_rank (0: the full copy).
Three stages, which may run in separate processes (train the arms side by side, one thread each):

    python benchmarks/studies/shapes_lora_fake.py train --arm full   --iterations 400 --num-steps 1 --threads 1
    python benchmarks/studies/shapes_lora_fake.py train --arm lora8  --iterations 400 --num-steps 1 --threads 1
    python benchmarks/studies/shapes_lora_fake.py time  --arms full lora8 lora32 --threads 2   # s/it, interleaved
    python benchmarks/studies/shapes_lora_fake.py score --arms full lora8 lora32 --num-steps 1 --label sid1-400

train: `sid_fast.composition.run_training` (the `sid-fast distill` path) into WORK/ARM; rerunning resumes from the
run's newest checkpoint. time: seconds per SiD iteration of each arm, measured side by side in one process (rounds
of --time-iterations iterations per arm, interleaved so that machine load hits every arm alike; median over
rounds). score: each arm's generator sampled on the same held-out prompts with the same noise, scored by the exact
checker (correctness, 95% Wilson intervals) and the feature-net Fréchet distance (95% t interval over chunks);
writes OUT.md (table, verdicts, commands) and appends one json line per row to OUT.jsonl.
Arms are named full or loraR (R = the LoRA rank).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SID_PRESET = ROOT / "sid_fast" / "presets" / "shapes_sid.yaml"


def arm_rank(arm: str) -> int:
    """full -> 0, loraR -> R."""
    if arm == "full":
        return 0
    if arm.startswith("lora") and arm[4:].isdigit() and int(arm[4:]) > 0:
        return int(arm[4:])
    raise SystemExit(f"arm {arm!r}: expected 'full' or 'loraR' with a rank R >= 1 (e.g. lora8)")


def arm_config(args, arm: str, shards: Path, extra: list[str] | None = None):
    from sid_fast.config import load_config
    from sid_fast.models.shapes import SHIPPED_TEACHER

    overrides = [f"teacher.path={args.teacher or SHIPPED_TEACHER}", f"teacher.fake_lora_rank={arm_rank(arm)}",
                 f"method.num_steps={args.num_steps}", f"train.iterations={args.iterations}",
                 f"train.seed={args.seed}", f"train.out_dir={Path(args.work) / arm}", f"data.shards={shards}",
                 "train.progress=false", "health.tensorboard=false"]
    return load_config(SID_PRESET, overrides + list(args.set) + list(extra or []))


def prompt_shards(args) -> Path:
    from sid_fast.demo import shapes as demo
    from sid_fast.encoders.minilm import MiniLMEncoder

    Path(args.work).mkdir(parents=True, exist_ok=True)
    encoder = MiniLMEncoder(max_length=20)
    shards = demo.prepare_shards(Path(args.work), encoder, progress=False, captions=args.captions)
    encoder.release()
    return shards


def train(args) -> None:
    from sid_fast.composition import run_training

    config = arm_config(args, args.arm, prompt_shards(args))
    out = Path(config.train.out_dir)
    start = time.perf_counter()
    path = run_training(config)
    seconds = time.perf_counter() - start
    record = {"arm": args.arm, "iterations": config.train.iterations, "seconds_this_process": round(seconds, 1),
              "threads": torch.get_num_threads(), "generator": str(path)}
    (out / "study.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[lora study] {args.arm}: {record}", flush=True)


PHASES = {"iteration": ["train.fake_warmup_iters=0"], "fake update": ["train.fake_warmup_iters=1000000000"]}
"""What `time` measures: a whole SiD iteration (fake-score update(s) + generator update), and the fake-score
update alone (an iteration of the fake-score warm-up, where the generator waits)."""


def time_arms(args) -> dict:
    """Median seconds per SiD iteration and per fake-score update of each arm, in interleaved rounds."""
    from sid_fast.composition import build_trainer
    from sid_fast.data import build_conditions
    from sid_fast.models.registry import build_teacher

    shards = prompt_shards(args)
    trainers = {}
    for arm in args.arms:
        for phase, extra in PHASES.items():
            config = arm_config(args, arm, shards, extra + ["train.resume=false",
                                                            f"train.out_dir={Path(args.work) / 'timing' / arm}"])
            bundle = build_teacher(config.teacher)
            bundle.conditions = build_conditions(config.data, None, config.train.seed)
            trainers[arm, phase] = build_trainer(config, bundle)
            trainers[arm, phase].train_step()  # warm-up iteration (allocator, first-call paths)
    times = {key: [] for key in trainers}
    for _ in range(args.rounds):
        for key, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.time_iterations):
                trainer.train_step()
            times[key].append((time.perf_counter() - start) / args.time_iterations)
    result = {phase: {arm: statistics.median(times[arm, phase]) for arm in args.arms} for phase in PHASES}
    trainable = {arm: sum(p.numel() for p in trainers[arm, "iteration"].engine.fake_score.parameters()
                          if p.requires_grad) for arm in args.arms}
    for arm in args.arms:
        print(f"[lora study] {arm}: " + ", ".join(f"{phase} {result[phase][arm]:.3f} s" for phase in PHASES)
              + f" (median of {args.rounds} rounds x {args.time_iterations}, {torch.get_num_threads()} threads), "
              f"fake score trainable parameters {trainable[arm]}", flush=True)
    return {"seconds_per_iteration": result["iteration"], "seconds_per_fake_update": result["fake update"],
            "threads": torch.get_num_threads(), "rounds": args.rounds, "iterations_per_round": args.time_iterations,
            "fake_trainable": trainable}


def score(args) -> dict:
    from sid_fast.demo import shapes as demo
    from sid_fast.encoders.minilm import MiniLMEncoder
    from sid_fast.models.shapes import SHIPPED_TEACHER
    from sid_fast.shapes.evaluate import generator_samples
    from sid_fast.shapes.features import SHIPPED_FEATURES, load_feature_net

    teacher_path = Path(args.teacher or SHIPPED_TEACHER)
    encoder = MiniLMEncoder(max_length=20)
    net = load_feature_net(SHIPPED_FEATURES) if SHIPPED_FEATURES.is_file() else None
    sets = demo.build_eval_sets(args.prompts, args.two_object_prompts, encoder, net, args.seed)
    encoder.release()
    chunks = demo.fd_chunks(args.prompts)
    timing = None
    timing_file = Path(args.work) / "timing.json"
    if timing_file.is_file():
        timing = json.loads(timing_file.read_text())
    rows, settings = [], []
    for arm in args.arms:
        run = Path(args.work) / arm
        path = run / "generator.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: train the arm first (train --arm {arm})")
        study = json.loads((run / "study.json").read_text()) if (run / "study.json").is_file() else {}
        generator = demo.load_run_generator(teacher_path, path)
        start = time.perf_counter()
        images = {objects: generator_samples(generator, s.cond, args.num_steps, args.seed + objects)
                  for objects, s in sets.items()}
        name = "full fake-score copy" if arm_rank(arm) == 0 else f"LoRA fake score, rank {arm_rank(arm)}"
        row = demo.score_images(name, images, sets, net, time.perf_counter() - start, chunks)
        rows.append(row)
        spi = timing["seconds_per_iteration"].get(arm) if timing else None
        settings.append({"arm": arm, "lora_rank": arm_rank(arm), "iterations": study.get("iterations"),
                         "seconds_per_iteration": spi, "timing_threads": timing and timing["threads"],
                         "fake_trainable": timing and timing["fake_trainable"].get(arm)})
        print(f"[lora study] {arm}: " + ", ".join(f"{k} {v}" for k, v in row.scores.items())
              + (f", FD {row.fd[0]:.1f}" if row.fd else ""), flush=True)
    verdicts = [demo.compare_rows(row, rows[0]) for row in rows[1:]]
    command = "python benchmarks/studies/shapes_lora_fake.py " + shlex.join(args.argv)
    common = {"label": args.label, "teacher": str(teacher_path), "num_steps": args.num_steps, "seed": args.seed,
              "prompts": args.prompts, "two_object_prompts": args.two_object_prompts, "fd_chunks": chunks,
              "overrides": list(args.set)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "a") as handle:
        for row, extra in zip(rows, settings):
            handle.write(json.dumps({**common, **extra, **row.as_dict()}) + "\n")
    table = demo.format_table(rows)
    speed = ""
    if timing:
        spi, spf = timing["seconds_per_iteration"], timing.get("seconds_per_fake_update", {})
        full_i, full_f = spi.get("full"), spf.get("full")
        speed = ("\n| arm | fake-score trainable parameters | s / iteration | vs full | s / fake-score update | vs full |"
                 "\n|---|---|---|---|---|---|\n") + "\n".join(
            f"| {arm} | {timing['fake_trainable'][arm]:,} | {s:.2f} | {s / full_i if full_i else float('nan'):.2f}x | "
            f"{spf.get(arm, float('nan')):.2f} | {spf.get(arm, float('nan')) / full_f if full_f else float('nan'):.2f}x |"
            for arm, s in spi.items()) + (
            f"\n\nSeconds per SiD iteration (the recipe's fake-score update + 1 generator update at its batch) and per "
            f"fake-score update alone (a warm-up iteration), median of {timing['rounds']} interleaved rounds of "
            f"{timing['iterations_per_round']} iterations, {timing['threads']} threads, measured side by side in one "
            f"process by `time`.\n")
    lines = "\n".join(f"- {v}" for v in verdicts)
    iterations = sorted({s["iterations"] for s in settings if s["iterations"]})
    out.with_suffix(".md").write_text(
        f"# LoRA fake score vs the full fake-score copy on ShapesWorld ({args.label})\n\n`{command}`\n\n{table}\n\n"
        f"{lines}\n{speed}\nSame teacher ({teacher_path}), recipe (sid_fast/presets/shapes_sid.yaml"
        f"{' + ' + ' '.join(args.set) if args.set else ''}), seed {args.seed}, prompt shards and "
        f"{'/'.join(map(str, iterations))} iterations for every arm, {args.num_steps}-step sampling; the arms differ "
        f"only in teacher.fake_lora_rank. correct: the exact checker's fraction correct (95% Wilson interval) on "
        f"{args.prompts} held-out one-object (1obj)"
        f"{f' and {args.two_object_prompts} two-object (2obj)' if args.two_object_prompts else ''} prompts; FD: "
        f"feature-net Fréchet distance against rendered truth of the one-object prompts, mean over {chunks} chunks "
        f"(95% t interval). Same prompts and noise for every row. sample s: wall-clock seconds.\n")
    print(table + "\n\n" + lines + f"\nwritten {out.with_suffix('.md')} and {out.with_suffix('.jsonl')}", flush=True)
    return {"rows": [r.as_dict() for r in rows], "verdicts": verdicts}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train", "time", "score"])
    parser.add_argument("--arm", default="full", help="train: the arm (full or loraR)")
    parser.add_argument("--arms", nargs="+", default=["full", "lora8", "lora32"], help="time/score: the arms")
    parser.add_argument("--teacher", default=None, help="teacher safetensors (default: the shipped one)")
    parser.add_argument("--num-steps", type=int, default=1, help="K of the generators")
    parser.add_argument("--iterations", type=int, default=850, help="iterations of each arm (the recipe's: 850)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides section.field=value for every arm")
    parser.add_argument("--rounds", type=int, default=5, help="time: interleaved rounds")
    parser.add_argument("--time-iterations", type=int, default=2, help="time: iterations per arm and round")
    parser.add_argument("--prompts", type=int, default=400, help="score: held-out one-object prompts")
    parser.add_argument("--two-object-prompts", type=int, default=200)
    parser.add_argument("--captions", type=int, default=0, help="training captions in the prompt shards (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="run")
    parser.add_argument("--work", default="runs/shapes-lora")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shapes_lora_fake"),
                        help="score: writes OUT.md and appends to OUT.jsonl")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for arm in [args.arm, *args.arms]:
        arm_rank(arm)
    if args.stage == "train":
        train(args)
    elif args.stage == "time":
        result = time_arms(args)
        Path(args.work).mkdir(parents=True, exist_ok=True)
        (Path(args.work) / "timing.json").write_text(json.dumps(result, indent=1) + "\n")
    else:
        return score(args)
    return None


if __name__ == "__main__":
    main()
