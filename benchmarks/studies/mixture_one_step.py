"""Study: what closes the 1-step gap on the exact 8-mode ring (issue 8's ≤ 2.5× noise-floor target).

Distils 1-step generators with the demo preset (sid_fast/presets/mixture_ring8.yaml) plus the given overrides, for
several seeds, and scores each the way tests/test_sid_mixture.py does (EMA generator, N = 4000, three sample draws
against three fresh true sets, energy distance as a multiple of the noise floor). Appends one json line per run.

    python benchmarks/studies/mixture_one_step.py --seeds 0 1 2 --set train.fake_updates=3 --label fu3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sid_fast.config import TeacherConfig, load_config
from sid_fast.demo.mixture import PRESET, distill_generator
from sid_fast.eval.distances import energy_noise_floor
from sid_fast.eval.mixture import score_samples
from sid_fast.models.registry import build_teacher
from sid_fast.sampler import few_step_sample

N = 4000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    parser.add_argument("--label", default="preset")
    parser.add_argument("--out", default="benchmarks/results/mixture_one_step.jsonl")
    parser.add_argument("--work", default="/tmp/mixture_one_step")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    bundle = build_teacher(TeacherConfig(kind="mixture", preset="ring8"))
    mixture = bundle.reference
    rng = torch.Generator().manual_seed(100)
    floor = energy_noise_floor(lambda n: mixture.sample(n, generator=rng), N, repeats=5)
    for seed in args.seeds:
        config = load_config(PRESET, [f"train.out_dir={args.work}/{args.label}-{seed}", "train.progress=false",
                                      f"train.seed={seed}", "method.num_steps=1"] + args.set)
        start = time.perf_counter()
        trainer = distill_generator(config, bundle)
        seconds = time.perf_counter() - start
        generator = trainer.engine.sampling_generator(ema=True)
        cond = bundle.conditions.unconditional(N)
        ratios = []
        for draw in range(3):
            z = torch.randn(N, 2, generator=torch.Generator().manual_seed(7 + draw))
            with torch.no_grad():
                samples = few_step_sample(generator, z, cond, config.method.num_steps, rng=torch.Generator().manual_seed(20 + draw))
            ratios.append(score_samples(samples, mixture, floor=floor, seed=11 + draw).ratio)
        row = {"label": args.label, "num_steps": config.method.num_steps, "overrides": args.set, "seed": seed, "ratio": sum(ratios) / 3,
               "draws": ratios, "train_seconds": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
