"""`sid-fast demo`: the embedded default job, end to end, with a report."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (report.md, samples.png, runs)")
    parser.add_argument("--samples", type=int, default=4000, help="samples per evaluated sampler")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything")


def run(args) -> int:
    from sid_fast.demo import mixture

    mixture.run(args.out, args.overrides, num_samples=args.samples, seed=args.seed)
    return 0
