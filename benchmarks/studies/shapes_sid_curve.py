"""Study: the learning curve of SiD on the ShapesWorld teacher (what the demo and reference presets are chosen from).

Trains with the demo preset (sid_fast/presets/shapes_demo.yaml) plus overrides and, every --every iterations,
samples the EMA and the raw generator on a fixed set of held-out one-object prompts with fixed noise, and logs the
checker's correctness (95% Wilson interval) and the feature-net Fréchet distance (sid_fast.demo.curve.Curve; raw_
keys: the raw weights). Rows before December 2026 used the keys correct_ema / correct_raw. Iteration 0 is the starting point
(the teacher's own one-step sampler). One json line per evaluation in --out.

    python benchmarks/studies/shapes_sid_curve.py --label lr1e-4 --set optim.lr_generator=1e-4 --iterations 400
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher safetensors (default: the shipped one)")
    parser.add_argument("--label", default="run")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides section.field=value")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/shapes-curve")
    parser.add_argument("--out", default="benchmarks/results/shapes_sid_curve.jsonl")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    from sid_fast.config import load_config
    from sid_fast.demo import shapes as demo
    from sid_fast.demo.curve import Curve
    from sid_fast.encoders.minilm import MiniLMEncoder
    from sid_fast.shapes.features import SHIPPED_FEATURES, load_feature_net

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    encoder = MiniLMEncoder(max_length=20)
    shards = demo.prepare_shards(work, encoder, progress=False)
    net = load_feature_net(SHIPPED_FEATURES) if SHIPPED_FEATURES.is_file() else None
    eval_set = demo.build_eval_set(1, args.prompts, encoder, net, args.seed)
    encoder.release()
    teacher = [f"teacher.path={args.teacher}"] if args.teacher else []
    config = load_config(demo.PRESET, teacher + [f"train.out_dir={work / args.label}", f"data.shards={shards}",
                                                 f"train.iterations={args.iterations}", "train.progress=false",
                                                 "train.ckpt_every=0", f"eval.every_images={args.every}",
                                                 f"train.seed={args.seed}"] + args.set)
    # eval.every_images counts images; evaluate every `every` iterations
    config = load_config(overrides=[f"eval.every_images={args.every * config.train.batch_size}"], base=config)
    from sid_fast.data import build_conditions
    from sid_fast.engine.build import build_engine
    from sid_fast.models.registry import build_teacher
    from sid_fast.trainer import SiDTrainer

    bundle = build_teacher(config.teacher)
    bundle.conditions = build_conditions(config.data, None, config.train.seed)
    trainer = SiDTrainer(config, build_engine(config, bundle), bundle.conditions, bundle.sample_shape)
    curve = Curve({1: eval_set}, net, config.method.num_steps, args.seed, Path(args.out), args.label,
                  demo.fd_chunks(args.prompts), raw=True)
    curve.evaluate(trainer)  # iteration 0: the starting point
    trainer.evaluator = curve
    trainer.fit()


if __name__ == "__main__":
    main()
