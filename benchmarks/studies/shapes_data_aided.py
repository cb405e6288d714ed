"""Study: does data-aided SiD²ₐ (DESIGN.md §5) improve a finished data-free ShapesWorld generator beyond what the same
budget of continued data-free SiD does?

From one start (--init: a data-free generator) and one teacher, two runs of --iterations iterations with the same
config (sid_fast/presets/shapes_sid.yaml + --set), the same seeds and the same generator warm-up:
  (a) SiD²ₐ: `sid-fast distill`'s path (sid_fast.composition.run_training, adversarial.enabled=true): real images rendered
      for the prompt shards' captions (sid_fast.shapes.real.ShapesRealData), the fake network as discriminator;
  (b) continued data-free SiD: the same path with adversarial.enabled=false (the generator still starts from --init,
      the fake network is a fresh teacher copy as in (a)); its generator waits as many iterations (train.fake_warmup_iters).
Then the start, (a) and (b) are sampled on the same held-out prompts with the same noise and scored by the exact
checker (correctness, 95% Wilson intervals; one- and two-object prompts) and, when the feature net exists, the
Fréchet distance against rendered truth (95% t interval over chunks). Writes <out>.md (table, verdict, command)
and appends one json line per row to <out>.jsonl.

    python benchmarks/studies/shapes_data_aided.py --init sid_fast/assets/shapes/sid-4step.safetensors --iterations 600

--init takes the shipped float16 format (sid_fast.demo.shapes.save_generator, e.g. launchers/shapes_reference.py's
generator-fp16.safetensors), a run's generator.safetensors, or a local-engine checkpoint step directory.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SID_PRESET = ROOT / "sid_fast" / "presets" / "shapes_sid.yaml"


def init_num_steps(path: Path) -> int | None:
    """K of the generator at `path` when it says: the card of a shipped-format file, the config.yaml of the run
    beside a run's generator.safetensors, or the config in a checkpoint directory's state.json."""
    import yaml

    if path.is_dir():
        state = path / "state.json"
        if state.is_file():
            return json.loads(state.read_text()).get("config", {}).get("method", {}).get("num_steps")
        return None
    from sid_fast.models.shapes import read_card

    steps = read_card(path).get("num_steps")
    if steps is None and (path.parent / "config.yaml").is_file():
        steps = (yaml.safe_load((path.parent / "config.yaml").read_text()) or {}).get("method", {}).get("num_steps")
    return None if steps is None else int(steps)


def generator_from(teacher, weights) -> torch.nn.Module:
    """A copy of `teacher` holding `weights` (a path for adversarial.init_generator, or a state dict)."""
    from sid_fast.adversarial import init_generator_from
    from sid_fast.api import init_student

    _, generator = init_student(teacher, None)
    if isinstance(weights, dict):
        generator.load_state_dict(weights)
    else:
        init_generator_from(generator, weights)
    return generator.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="the data-free generator to start from (file or checkpoint dir)")
    parser.add_argument("--teacher", default=None, help="teacher safetensors (default: the shipped one)")
    parser.add_argument("--num-steps", type=int, default=None, help="K (default: what --init says, else the preset's)")
    parser.add_argument("--iterations", type=int, default=600, help="iterations of each run")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (16)")
    parser.add_argument("--warmup-images", type=int, default=None,
                        help="no generator updates before this many images (default: the first sixth of the run)")
    parser.add_argument("--adversarial-from-images", type=int, default=None,
                        help="SiD²ₐ's L_adv from this many images (default: from a quarter of the run)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides section.field=value for both runs")
    parser.add_argument("--prompts", type=int, default=400, help="held-out one-object prompts")
    parser.add_argument("--two-object-prompts", type=int, default=200)
    parser.add_argument("--captions", type=int, default=0, help="training captions in the prompt shards (0: all)")
    parser.add_argument("--features", default=None, help="feature net for FD (default: the shipped one when present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="run")
    parser.add_argument("--work", default="runs/shapes-data-aided")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shapes_data_aided"),
                        help="writes OUT.md and appends to OUT.jsonl")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    from sid_fast.composition import run_training
    from sid_fast.config import load_config
    from sid_fast.demo import shapes as demo
    from sid_fast.encoders.minilm import MiniLMEncoder
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import SHIPPED_TEACHER, load_shapes_transformer
    from sid_fast.shapes.evaluate import generator_samples
    from sid_fast.shapes.features import SHIPPED_FEATURES, load_feature_net

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    teacher_path = Path(args.teacher) if args.teacher else SHIPPED_TEACHER
    if not teacher_path.is_file():
        raise SystemExit(f"the ShapesWorld teacher {teacher_path} is missing: give --teacher FILE (docs/shapes.md)")
    init = Path(args.init)
    if not init.exists():
        raise SystemExit(f"--init {init} does not exist")
    num_steps = args.num_steps or init_num_steps(init)
    work = Path(args.work) / args.label
    base = [f"teacher.path={teacher_path}", f"train.iterations={args.iterations}", f"train.seed={args.seed}",
            "train.progress=false", "train.ckpt_every=0", "train.resume=false", "health.tensorboard=false",
            f"adversarial.init_generator={init}"]
    base += [f"method.num_steps={num_steps}"] if num_steps else []
    base += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    config = load_config(SID_PRESET, base + list(args.set))  # validated before any work
    train = config.train
    per_iteration = train.images_per_iteration()  # images_seen per iteration
    warmup = args.warmup_images if args.warmup_images is not None else per_iteration * (args.iterations // 6)
    adv_from = args.adversarial_from_images if args.adversarial_from_images is not None \
        else max(warmup, per_iteration * (args.iterations // 4))
    warmup_iters = math.ceil(warmup / per_iteration)  # (b) waits as long: iteration i updates G iff i·per_it ≥ warmup
    k = config.method.num_steps

    encoder = MiniLMEncoder(max_length=config.teacher.max_sequence_length or 20)
    shards = demo.prepare_shards(Path(args.work), encoder, progress=False, captions=args.captions)
    features = Path(args.features) if args.features else SHIPPED_FEATURES
    net = load_feature_net(features) if features.is_file() else None
    sets = demo.build_eval_sets(args.prompts, args.two_object_prompts, encoder, net, args.seed)
    encoder.release()
    chunks = demo.fd_chunks(args.prompts)
    teacher = SD3Adapter(load_shapes_transformer(teacher_path)).eval().requires_grad_(False)

    def scored(name: str, generator, train_seconds: float | None):
        start = time.perf_counter()
        images = {objects: generator_samples(generator, s.cond, k, args.seed + objects) for objects, s in sets.items()}
        row = demo.score_images(name, images, sets, net, time.perf_counter() - start, chunks)
        row.train_seconds = train_seconds
        print(f"[data-aided study] {name}: " + ", ".join(f"{key} {v}" for key, v in row.scores.items())
              + (f", FD {row.fd[0]:.1f}" if row.fd else ""), flush=True)
        return row

    rows = [scored("start (data-free generator)", generator_from(teacher, init), None)]

    common = [f"data.shards={shards}"]
    aided = load_config(overrides=common + [
        "adversarial.enabled=true", f"adversarial.generator_warmup_images={warmup}",
        f"adversarial.adversarial_from_images={adv_from}", "train.fake_warmup_iters=0",
        f"train.out_dir={work / 'data-aided'}"], base=config)
    print(f"[data-aided study] (a) SiD²ₐ: {args.iterations} iterations of batch {train.batch_size}, generator from "
          f"{warmup} images, L_adv from {adv_from} images", flush=True)
    start = time.perf_counter()
    path = run_training(aided)
    rows.append(scored(f"SiD²ₐ data-aided (+{args.iterations} it)", generator_from(teacher, path),
                       time.perf_counter() - start))

    free = load_config(overrides=common + [f"train.fake_warmup_iters={warmup_iters}",
                                           f"train.out_dir={work / 'data-free'}"], base=config)
    print(f"[data-aided study] (b) continued data-free SiD: {args.iterations} iterations, generator from iteration "
          f"{warmup_iters}", flush=True)
    start = time.perf_counter()
    path = run_training(free)  # adversarial.enabled=false: the generator still starts from adversarial.init_generator
    rows.append(scored(f"continued data-free SiD (+{args.iterations} it)", generator_from(teacher, path),
                       time.perf_counter() - start))

    verdicts = [demo.compare_rows(rows[1], rows[2]), demo.compare_rows(rows[1], rows[0]), demo.compare_rows(rows[2], rows[0])]
    command = "python benchmarks/studies/shapes_data_aided.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    settings = {"label": args.label, "teacher": str(teacher_path), "init": str(init), "num_steps": k,
                "iterations": args.iterations, "batch_size": train.batch_size, "warmup_images": warmup,
                "adversarial_from_images": adv_from, "fake_warmup_iters_data_free": warmup_iters, "seed": args.seed,
                "prompts": args.prompts, "two_object_prompts": args.two_object_prompts, "fd_chunks": chunks,
                "feature_net": str(features) if net is not None else None, "overrides": list(args.set)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "a") as handle:
        for row in rows:
            handle.write(json.dumps({**settings, **row.as_dict()}) + "\n")
    table = demo.format_table(rows)
    lines = "\n".join(f"- {v}" for v in verdicts)
    out.with_suffix(".md").write_text(
        f"# SiD²ₐ vs continued data-free SiD on ShapesWorld ({args.label})\n\n`{command}`\n\n{table}\n\n{lines}\n\n"
        f"Same start ({init}), teacher ({teacher_path}), config (sid_fast/presets/shapes_sid.yaml"
        f"{' + ' + ' '.join(args.set) if args.set else ''}), seed {args.seed}, {args.iterations} iterations of batch "
        f"{train.batch_size}, {k}-step sampling; generator updates from {warmup} images in both runs, SiD²ₐ's L_adv "
        f"from {adv_from} images. correct: the exact checker's fraction correct (95% Wilson interval) on "
        f"{args.prompts} held-out one-object (1obj) and {args.two_object_prompts} two-object (2obj) prompts; FD: "
        f"feature-net Fréchet distance against rendered truth of the one-object prompts, mean over {chunks} chunks "
        f"(95% t interval){'' if net is not None else ' (no feature net: not measured)'}. Same prompts and noise "
        f"for every row. sample s / train s: wall-clock seconds.\n")
    print(table + "\n\n" + lines + f"\nwritten {out.with_suffix('.md')} and {out.with_suffix('.jsonl')}", flush=True)
    return {"rows": [r.as_dict() for r in rows], "verdicts": verdicts, **settings}


if __name__ == "__main__":
    main()
