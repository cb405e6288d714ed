"""The reference SiD distillations of the shipped ShapesWorld teacher (issue 7, docs/shapes.md): one run per K in
--steps with the preset sid_fast/presets/shapes_sid.yaml, each scored against the teacher's Euler samplers on the
same held-out prompts, and shipped as float16 safetensors with its scores in the card.

    python launchers/shapes_reference.py --steps 1 4 --out runs/shapes-reference          # add --ship to copy into assets
    python launchers/shapes_reference.py --steps 1 --set train.iterations=2000 optim.lr_generator=3e-5

Rerunning the same command resumes each run from its newest checkpoint (the trainer's own resume; raise
train.iterations to go on past the end) and reuses the prompt shards and the teacher's scores. Progress goes to the
terminal, each run's log.jsonl and out/reference.jsonl.

Learning curves (docs/shapes.md): --curve-every N scores the EMA generator every N iterations (and the start) on the
same held-out prompts and noise as the final rows, appending to out/curve.jsonl; the long background runs:

    python launchers/shapes_reference.py --steps 1 --out runs/shapes-long/sid2a-1step --curve-every 100 \
        --set adversarial.enabled=true adversarial.init_generator=sid_fast/assets/shapes/sid-1step.safetensors ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PRESET = Path(__file__).resolve().parents[1] / "sid_fast" / "presets" / "shapes_sid.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="generator step counts K to distil (default: 1 4, or none when --from is given)")
    parser.add_argument("--out", default="runs/shapes-reference")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides section.field=value")
    parser.add_argument("--prompts", type=int, default=400, help="held-out one-object prompts per score")
    parser.add_argument("--two-object-prompts", type=int, default=200)
    parser.add_argument("--captions", type=int, default=0, help="training captions in the prompt shards (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--ship", action="store_true", help="copy the generators into sid_fast/assets/shapes/")
    parser.add_argument("--curve-every", type=int, default=0, metavar="N",
                        help="score the EMA generator every N iterations into out/curve.jsonl (0: only at the end) and "
                             "keep the lowest-FD one as out/LABEL-Kstep/best-ema.safetensors")
    parser.add_argument("--curve-raw", action="store_true", help="the curve scores the raw weights too (raw_ keys; best-raw.safetensors)")
    parser.add_argument("--label", default="sid", help="run directories are out/LABEL-Kstep (default: sid)")
    parser.add_argument("--from", dest="trained", nargs="*", default=[], metavar="K=PATH",
                        help="score (and ship) a K-step generator trained elsewhere instead of training it here: a "
                             "shipped-format file (e.g. from launchers/shapes_reference_gpu.py), a run's "
                             "generator.safetensors, or a local-engine checkpoint directory (its EMA generator)")
    args = parser.parse_args(argv)

    import torch

    from sid_fast.composition import run_training
    from sid_fast.config import load_config
    from sid_fast.demo import shapes as demo
    from sid_fast.demo.curve import Curve
    from sid_fast.encoders.minilm import MiniLMEncoder
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import SHIPPED_TEACHER, load_shapes_transformer, read_card
    from sid_fast.shapes.evaluate import teacher_samples
    from sid_fast.shapes.features import SHIPPED_FEATURES, load_feature_net

    trained = {}
    for item in args.trained:
        k, _, file = item.partition("=")
        if not k.isdigit() or not Path(file).exists():
            parser.error(f"--from takes K=PATH with an existing PATH; got {item!r}")
        trained[int(k)] = Path(file)
    args.steps = sorted(set(args.steps if args.steps is not None else ([] if trained else [1, 4])) | set(trained))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {k: load_config(PRESET, [f"method.num_steps={k}", f"train.out_dir={out / f'{args.label}-{k}step'}",
                                       f"train.seed={args.seed}"] + [f"{s}" for s in args.set]) for k in args.steps}
    teacher_path = Path(configs[args.steps[0]].teacher.path or SHIPPED_TEACHER)
    encoder = MiniLMEncoder(max_length=20)
    shards = demo.prepare_shards(out, encoder, captions=args.captions) if set(args.steps) - set(trained) else None  # only training needs them
    net = load_feature_net(SHIPPED_FEATURES) if SHIPPED_FEATURES.is_file() else None
    sets = demo.build_eval_sets(args.prompts, args.two_object_prompts, encoder, net, args.seed)
    uncond = encoder.unconditional().to(dtype=torch.float32)
    encoder.release()
    chunks = demo.fd_chunks(args.prompts)
    teacher = SD3Adapter(load_shapes_transformer(teacher_path)).eval().requires_grad_(False)
    log = out / "reference.jsonl"

    def record(row, **extra) -> dict:
        entry = {**row.as_dict(), **extra, "fd_chunks": chunks}
        with open(log, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)
        return entry

    def timed(name, sampler):
        start = time.perf_counter()
        images = {objects: sampler(s.cond, objects) for objects, s in sets.items()}
        return demo.score_images(name, images, sets, net, time.perf_counter() - start, chunks)

    same = {"seed": args.seed, "n_1obj": args.prompts, "n_2obj": args.two_object_prompts, "fd_chunks": chunks}
    earlier = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []

    def load_trained(path: Path):
        """(generator, how it was made) of a shipped-format file, a run's generator.safetensors or a checkpoint."""
        if path.is_file() and read_card(path):
            return demo.load_generator(path)
        import yaml

        here = path if path.is_dir() else path.parent  # a checkpoint step directory, or the file's directory
        made = {"weights": str(path), "machine": "this machine"}
        run = next((d for d in (here, *here.parents) if (d / "config.yaml").is_file()), None)
        if run is not None:  # the run's whole config goes into the card, as for generators trained here
            made.update(run=str(run), config=yaml.safe_load((run / "config.yaml").read_text()))
        if (here / "state.json").is_file():
            state = json.loads((here / "state.json").read_text())
            made.update(iterations=state["step"], images_seen=state["images_seen"])
        return demo.load_run_generator(teacher_path, path), made

    baseline = {}
    for steps in demo.TEACHER_STEPS:
        name = f"teacher Euler {steps}-step"
        kept = [r for r in earlier if r.get("name") == name and all(r.get(k) == v for k, v in same.items())]
        if kept:  # scored by an earlier call on the same prompts and noise: deterministic, not repeated
            baseline[steps] = kept[-1]
            continue
        row = timed(name, lambda cond, objects, steps=steps: teacher_samples(
            teacher, cond, uncond, steps, 4.0, args.seed + objects, progress=True))
        baseline[steps] = record(row, seed=args.seed)
    for k, config in configs.items():
        if k in trained:  # trained elsewhere: its card says how; scored here exactly like a run trained here
            generator, made = load_trained(trained[k])
            iterations = made.get("iterations", made.get("step"))  # a Curve's best-{ema,raw} card: the step
            seconds, config_ref = made.get("run_seconds"), made.get("config")
            machine = made.get("machine", "a machine its card does not name")
            print(f"[reference] scoring the {k}-step generator {trained[k]} ({iterations} iterations on {machine})",
                  flush=True)
        else:
            config = load_config(overrides=[f"data.shards={shards}"], base=config)
            curve = None
            if args.curve_every:
                every = args.curve_every * config.train.images_per_iteration()
                config = load_config(overrides=[f"eval.every_images={every}"], base=config)
                curve = Curve(sets, net, k, args.seed, out / "curve.jsonl", f"{args.label}-{k}step", chunks,
                              raw=args.curve_raw, best_dir=out / f"{args.label}-{k}step")
            print(f"[reference] distilling a {k}-step generator: {config.train.iterations} iterations of batch "
                  f"{config.train.batch_size} into {config.train.out_dir}", flush=True)
            start = time.perf_counter()
            path = run_training(config, evaluator=curve)
            seconds = round(time.perf_counter() - start, 1)
            generator = demo.load_run_generator(teacher_path, path)
            iterations, config_ref = config.train.iterations, str(Path(config.train.out_dir) / "config.yaml")
        row = timed(f"SiD {k}-step", lambda cond, objects, k=k, g=generator: demo._generator_images(g, cond, k, args.seed + objects))
        entry = record(row, iterations=iterations, run_seconds=seconds, seed=args.seed, overrides=list(args.set))
        card = {"made_by": "python launchers/shapes_reference.py " + " ".join(argv or sys.argv[1:]),
                "teacher": str(teacher_path), "num_steps": k, "config": config_ref,
                "scores": entry, "teacher_scores": baseline}
        if k in trained:
            card["trained_by"] = made
        (out / f"{args.label}-{k}step").mkdir(parents=True, exist_ok=True)
        shipped = demo.save_generator(generator, out / f"{args.label}-{k}step" / "generator-fp16.safetensors", card)
        if args.ship:
            target = demo.REFERENCE_GENERATORS[k] if k in demo.REFERENCE_GENERATORS else shipped
            shutil.copyfile(shipped, target)
            print(f"[reference] shipped {target}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
