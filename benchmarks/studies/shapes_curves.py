"""Learning curves of ShapesWorld distillations: plots and a results table from the curve files that
`launchers/shapes_reference.py --curve-every N` writes (docs/shapes.md, "Learning curves").

For each run (LABEL=CURVE.jsonl, rows of `sid_fast.demo.curve.Curve`): held-out one-object correctness and Fréchet
distance, with their 95% intervals, against the training images seen, next to the teacher's Euler 1/4/28-step levels
on the same prompts and noise (rows `teacher Euler N-step` of --teacher, a reference.jsonl). Writes OUT.png (two
panels), OUT.md (every evaluation, the best FD of each run, the command) and OUT.jsonl (the curve rows, labelled).

    python benchmarks/studies/shapes_curves.py --run "SiD2a 1-step=runs/shapes-long/sid2a-1step/curve.jsonl" \\
        --teacher runs/shapes-long/sid2a-1step/reference.jsonl --out benchmarks/results/shapes_curves/sid2a
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"{path}: no such curve file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}:{number}: not a json line ({error.msg})") from None
    return rows


def teacher_levels(rows: list[dict]) -> dict[int, dict]:
    """{steps: the last `teacher Euler N-step` row} of a reference.jsonl."""
    levels = {}
    for row in rows:
        name = row.get("name", "")
        if name.startswith("teacher Euler ") and name.endswith("-step"):
            levels[int(name[len("teacher Euler "):-len("-step")])] = row
    return levels


def _interval(row: dict, key: str) -> str:
    low, high = row[f"{key}_ci"]
    return f"{row[key]:.3f} [{low:.2f}, {high:.2f}]" if key.startswith("correct") else f"{row[key]:.0f} [{low:.0f}, {high:.0f}]"


def table(runs: dict[str, list[dict]], levels: dict[int, dict]) -> str:
    lines = ["| run | iteration | images seen | correct 1obj | correct 2obj | FD |", "|---|---|---|---|---|---|"]
    for steps, row in sorted(levels.items()):
        lines.append(f"| teacher Euler {steps}-step (CFG 4) | | | {_interval(row, 'correct_1obj')} | "
                     f"{_interval(row, 'correct_2obj') if 'correct_2obj' in row else ''} | "
                     f"{_interval(row, 'fd') if 'fd' in row else ''} |")
    for label, rows in runs.items():
        for row in rows:
            lines.append(f"| {label} | {row['step']} | {row['images_seen']} | {_interval(row, 'correct_1obj')} | "
                         f"{_interval(row, 'correct_2obj') if 'correct_2obj' in row else ''} | "
                         f"{_interval(row, 'fd') if 'fd' in row else ''} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], levels: dict[int, dict], path: Path, title: str, x: str = "images") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("correct_1obj", "held-out one-object correctness", False), ("fd", "Fréchet distance (features)", True))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name, log) in zip(axes, panels):
        bases = [label for label in runs if not label.endswith(" (raw)")]
        for label, rows in runs.items():
            rows = [r for r in rows if key in r]
            if not rows:
                continue
            raw = label.endswith(" (raw)")  # the raw weights: the run's colour, dashed
            colour = colours[bases.index(label[:-len(" (raw)")] if raw else label) % len(colours)]
            xs = [r["images_seen"] / 1000 if x == "images" else r["step"] for r in rows]
            ax.plot(xs, [r[key] for r in rows], marker="o", markersize=3, color=colour, label=label,
                    linestyle="--" if raw else "-")
            ax.fill_between(xs, [r[f"{key}_ci"][0] for r in rows], [r[f"{key}_ci"][1] for r in rows],
                            color=colour, alpha=0.08 if raw else 0.15, linewidth=0)
        for steps, style in zip(sorted(levels), (":", "--", "-.")):
            if key in levels[steps]:
                ax.axhline(levels[steps][key], color="black", linestyle=style, linewidth=1,
                           label=f"teacher Euler {steps}-step")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("training images seen (thousands)" if x == "images" else "iterations (generator updates after warm-up)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CURVE.jsonl",
                        help="a run's curve file (repeat); the label names it in the plot and table")
    parser.add_argument("--teacher", required=True, help="a reference.jsonl with the teacher's Euler rows")
    parser.add_argument("--title", default="SiD on the ShapesWorld teacher: held-out 400 one-object prompts")
    parser.add_argument("--out", required=True, help="writes OUT.png, OUT.md and OUT.jsonl")
    parser.add_argument("--png", default=None, help="the plot's path (default OUT.png)")
    parser.add_argument("--x", choices=("images", "iterations"), default="images",
                        help="the plots' x axis: training images seen (fake-score and generator steps) or iterations")
    parser.add_argument("--raw", action="append", default=[], metavar="LABEL",
                        help="also plot this run's raw (non-EMA) weights, as 'LABEL (raw)' (repeat)")
    args = parser.parse_args(argv)

    runs = {}
    for item in args.run:
        label, sep, file = item.partition("=")
        if not sep or not label:
            parser.error(f"--run takes LABEL=CURVE.jsonl; got {item!r}")
        rows = sorted(read_rows(Path(file)), key=lambda r: r["step"])
        if not rows:
            raise SystemExit(f"{file}: no curve rows")
        runs[label] = rows
        if label in args.raw:  # the raw weights' scores of the same evaluations (--curve-raw)
            runs[f"{label} (raw)"] = [{**{k[4:]: v for k, v in r.items() if k.startswith("raw_")},
                                       "step": r["step"], "images_seen": r["images_seen"]} for r in rows if "raw_fd" in r]
    levels = teacher_levels(read_rows(Path(args.teacher)))
    if not levels:
        raise SystemExit(f"{args.teacher}: no `teacher Euler N-step` rows")
    out = Path(args.out)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    unknown = sorted(set(args.raw) - set(runs))
    if unknown:
        parser.error(f"--raw names runs that --run does not give: {unknown}")
    plot(runs, levels, png, args.title, args.x)
    best = {label: min((r for r in rows if "fd" in r), key=lambda r: r["fd"], default=None) for label, rows in runs.items()}
    summary = "\n".join(f"- {label}: lowest FD at iteration {row['step']} ({row['images_seen']} images): "
                        f"{_interval(row, 'fd')}, correctness {_interval(row, 'correct_1obj')}"
                        for label, row in best.items() if row is not None)
    command = "python benchmarks/studies/shapes_curves.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"# {args.title}\n\n`{command}`\n\n![curves]({os.path.relpath(png, out.parent)})\n\n{summary}\n\n"
        f"{table(runs, levels)}\n\ncorrect: the exact checker's fraction correct (95% Wilson interval); FD: "
        f"feature-net Fréchet distance against rendered truth of the one-object prompts, mean over chunks (95% t "
        f"interval); EMA generator; the same prompts and noise at every point and for the teacher rows.\n")
    with open(out.with_suffix(".jsonl"), "w") as handle:
        for label, rows in runs.items():
            for row in rows:
                handle.write(json.dumps({**row, "run": label}) + "\n")
    print(f"written {png}, {out.with_suffix('.md')}, {out.with_suffix('.jsonl')}")
    return {"best": best, "levels": levels}


if __name__ == "__main__":
    main()
