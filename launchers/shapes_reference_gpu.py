"""The reference SiD distillations of the ShapesWorld teacher on one GPU, time-boxed for a short lease (docs/shapes.md).

    python launchers/shapes_reference_gpu.py --shards DIR --out OUT --budget 150 --steps 1 4 [--set key=value ...]
    python launchers/shapes_teacher_gpu.py --join OUT/sid-1step.part1.safetensors OUT/sid-1step.part2.safetensors \
        --to runs/sid-1step.safetensors                # back home: one file per generator, then score and ship:
    python launchers/shapes_reference.py --from 1=runs/sid-1step.safetensors 4=runs/sid-4step.safetensors --ship

Trains with the same code path as `sid-fast distill` (`run_training`, preset sid_fast/presets/shapes_sid.yaml,
train.device=cuda) from already prepared prompt shards, so the GPU machine needs neither the text encoder nor the
scoring: a 40-iteration smoke run measures s/iteration from its own log (start-up excluded), then each K in --steps
gets an equal share of the time left as iterations (10% kept for saving). Each generator's EMA weights go to OUT in two
parts, sid-{K}step.part{1,2}.safetensors (float16, the shipped format, the run's config and timing in the card; join
them with launchers/shapes_teacher_gpu.py --join), with each run's log and results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes_teacher_gpu import split_teacher  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "sid_fast" / "presets" / "shapes_sid.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="prompt shards (sid-fast prepare prompts / the demo's)")
    parser.add_argument("--out", default="runs/shapes-reference-gpu-out")
    parser.add_argument("--work", default="/tmp/shapes-reference-gpu")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for all runs together")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--teacher", default=None, help="teacher safetensors (default: the shipped one)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--min-iterations", type=int, default=100, help="skip a run that gets fewer")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides section.field=value, for every run")
    args = parser.parse_args(argv)

    import torch

    from sid_fast.composition import run_training
    from sid_fast.config import load_config, to_dict
    from sid_fast.demo.shapes import load_run_generator, save_generator
    from sid_fast.models.shapes import SHIPPED_TEACHER

    started = time.monotonic()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or str(SHIPPED_TEACHER)
    results = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
               "torch": torch.__version__, "teacher": teacher, "runs": []}

    def config_for(k: int, extra: list[str]):
        return load_config(PRESET, [f"method.num_steps={k}", f"teacher.path={teacher}", f"data.shards={args.shards}",
                                    f"train.device={args.device}", "train.progress=false"] + list(args.set) + extra)

    t = time.monotonic()
    smoke_iters = 40
    smoke = config_for(max(args.steps), [f"train.out_dir={work / 'smoke'}", f"train.iterations={smoke_iters}",
                                         "train.fake_warmup_iters=5", f"train.ckpt_every={smoke_iters}",
                                         "train.log_every=10"])
    run_training(smoke)
    wall = (time.monotonic() - t) / smoke_iters
    # the speed of the last 10 iterations (from the run's own log), not the start-up: the first lease sized its runs
    # from wall time including CUDA start-up, 7x too long, and used a sixth of its budget
    lines = [json.loads(line) for line in (Path(smoke.train.out_dir) / "log.jsonl").read_text().splitlines()]
    per_step_images = smoke.train.batch_size * (smoke.train.fake_updates + 1) * smoke.train.grad_accum
    per_iter = per_step_images / lines[-1]["images_per_s"] if lines and lines[-1].get("images_per_s") else wall
    results["smoke_s_per_iteration"] = round(per_iter, 4)
    print(f"[reference-gpu] smoke: {per_iter:.3f} s/iteration (K={max(args.steps)}; {wall:.3f} with start-up)",
          flush=True)

    for index, k in enumerate(args.steps):
        share = (args.budget - (time.monotonic() - started)) / (len(args.steps) - index)
        iterations = int(0.9 * share / per_iter) // 10 * 10
        if iterations < args.min_iterations:
            results["runs"].append({"num_steps": k, "skipped": f"{share:.0f} s left for it"})
            continue
        config = config_for(k, [f"train.out_dir={work / f'sid-{k}step'}", f"train.iterations={iterations}",
                                f"train.ckpt_every={iterations}"])
        t = time.monotonic()
        path = run_training(config)
        seconds = time.monotonic() - t
        card = {"made_by": "python launchers/shapes_reference_gpu.py " + " ".join(argv or sys.argv[1:]),
                "teacher": teacher, "num_steps": k, "iterations": iterations, "run_seconds": round(seconds, 1),
                "machine": results["device"], "config": to_dict(config)}
        whole = save_generator(load_run_generator(Path(teacher), path), work / f"sid-{k}step.safetensors", card)
        parts = split_teacher(whole, out, f"sid-{k}step")  # files back from a lent machine: at most 16 MiB each
        log = Path(config.train.out_dir) / "log.jsonl"
        if log.is_file():
            (out / f"sid-{k}step-log.jsonl").write_text(log.read_text())
        results["runs"].append({"num_steps": k, "iterations": iterations, "seconds": round(seconds, 1),
                                "s_per_iteration": round(seconds / iterations, 4), "parts": [p.name for p in parts]})
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"[reference-gpu] K={k}: {iterations} iterations in {seconds:.1f} s -> {parts}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
