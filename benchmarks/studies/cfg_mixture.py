"""Study: what classifier-free guidance does to SiD on an exact class-conditional mixture (DESIGN §4).

A guided velocity field is not the flow of any one distribution, so there is no exact target. We compare
SiD generators trained with κ1 = κ2 = κ4 = κ, with κ1 = κ2 = 1 and κ4 = κ, and unguided (all 1), against the
teacher's 100-step guided and unguided Euler ODE, by energy distance (to the guided ODE's samples and to the
true conditional data), mean log-likelihood under the exact conditional mixture, spread around the nearest
mode, and mode coverage. Writes a Markdown table and a jsonl log.

    python benchmarks/studies/cfg_mixture.py --preset mix5d-cond3 --kappa 2 --iterations 3000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sid_fast.api import init_student
from sid_fast.config import TeacherConfig, load_config
from sid_fast.engine import LocalEngine
from sid_fast.eval.distances import energy_distance, mode_assignment
from sid_fast.models.registry import build_teacher
from sid_fast.sampler import euler_sample, few_step_sample
from sid_fast.trainer import SiDTrainer


def spread(x: torch.Tensor, mixture) -> float:
    """Mean distance to the nearest mode divided by the true expectation of that distance (1 = right width)."""
    nearest = mode_assignment(x, mixture.means)
    dist = (x.double() - mixture.means[nearest]).norm(dim=1)
    truth = mixture.sample(20000, generator=torch.Generator().manual_seed(9))
    true_dist = (truth.double() - mixture.means[mode_assignment(truth, mixture.means)]).norm(dim=1)
    return float(dist.mean() / true_dist.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mix5d-cond3")
    parser.add_argument("--kappa", type=float, default=2.0)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--out", default="benchmarks/results/cfg_mixture")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = build_teacher(TeacherConfig(kind="mixture", preset=args.preset))
    mixture, n, kappa = bundle.reference, args.samples, args.kappa
    labels = torch.arange(n) % mixture.num_classes
    cond, uncond = bundle.conditions.sample(n, torch.Generator()), bundle.conditions.unconditional(n)
    cond.labels = labels
    z = torch.randn(n, *bundle.sample_shape, generator=torch.Generator().manual_seed(1))
    truth = mixture.sample(n, labels, generator=torch.Generator().manual_seed(2))
    guided_ode = euler_sample(bundle.teacher, z, cond, 100, uncond=uncond, guidance_scale=kappa)
    rows = {}

    def record(name, x, seconds=None):
        rows[name] = {
            "ED to guided ODE": energy_distance(x, guided_ode),
            "ED to true data": energy_distance(x, truth),
            "mean log p(x|c)": float(mixture.log_prob(x, labels).mean()),
            "spread": spread(x, mixture),
            "finite": bool(torch.isfinite(x).all()),
        }
        if seconds is not None:
            rows[name]["train s"] = round(seconds, 1)
        print(name, rows[name], flush=True)

    record("true data", truth)
    record("teacher ODE 100, unguided", euler_sample(bundle.teacher, z, cond, 100))
    record(f"teacher ODE 100, CFG {kappa}", guided_ode)
    settings = {
        "SiD 1-step, unguided (κ=1)": (1.0, 1.0, 1.0),
        f"SiD 1-step, κ1=κ2=κ4={kappa}": (kappa, kappa, kappa),
        f"SiD 1-step, κ1=κ2=1, κ4={kappa}": (1.0, 1.0, kappa),
    }
    for name, (k1, k2, k4) in settings.items():
        config = load_config(overrides=[
            f"teacher.preset={args.preset}", "method.num_steps=1", f"method.kappa_fake_loss={k1}",
            f"method.kappa_fake_gen={k2}", f"method.kappa_teacher={k4}", "optim.lr_generator=3e-4",
            "optim.lr_fake=1e-3", "train.batch_size=256", "train.ema_decay=0.999", f"train.iterations={args.iterations}",
            f"train.out_dir={out / 'runs' / str(len(rows))}", "train.resume=false", "train.progress=false", "train.log_every=500",
        ])
        fake, generator = init_student(bundle.teacher, bundle.student)
        engine = LocalEngine(bundle.teacher, fake, generator, config.optim, ema_decay=config.train.ema_decay)
        start = time.perf_counter()
        SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape).fit()
        with torch.no_grad():
            x = few_step_sample(engine.sampling_generator(True), z, cond, 1)
        record(name, x, time.perf_counter() - start)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    keys = ["ED to guided ODE", "ED to true data", "mean log p(x|c)", "spread", "train s"]
    lines = [f"| {args.preset}, κ={kappa}, n={n} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                                              for k in keys) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
