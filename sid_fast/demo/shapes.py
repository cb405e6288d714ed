"""The ShapesWorld demo (`sid-fast demo`, issue 7): a text-to-image flow-matching DiT distilled by SiD on a CPU.

Steps, all through the code path of real distillations:
  1. prompt shards of the one-object training captions, encoded with MiniLM (`sid-fast prepare prompts`), reused
     when they already exist;
  2. the shipped teacher's Euler CFG samplers at 1, 4 and 28 steps, the shipped reference SiD generators (when
     present) and a fresh short SiD run from the teacher (`presets/shapes_demo.yaml` -> build_engine -> SiDTrainer),
     each sampled on the same held-out prompts with the same seeds;
  3. scores: the exact attribute checker's correctness (95% Wilson interval) on held-out one-object prompts (and
     two-object prompts, the harder set), the Fréchet distance in the shipped feature net's space against rendered
     truth for the same prompts (95% t interval over chunks), PNG grids, report.md, results.json.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.config import SiDConfig, dump_yaml, load_config
from sid_fast.models.protocol import Conditioning

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "shapes"
PRESET = Path(__file__).resolve().parent.parent / "presets" / "shapes_demo.yaml"
REFERENCE_GENERATORS = {1: ASSETS / "sid-1step.safetensors", 4: ASSETS / "sid-4step.safetensors"}
TEACHER_STEPS = (1, 4, 28)


@dataclass
class EvalSet:
    """Held-out prompts of one caption set, their encodings and rendered-truth features (same specs, same count)."""

    objects: int
    captions: list[str]
    specs: list
    cond: Conditioning
    truth_features: Tensor | None


@dataclass
class Row:
    name: str
    scores: dict  # "1obj"/"2obj" -> checker Score
    fd: tuple[float, tuple[float, float]] | None
    seconds: float
    train_seconds: float | None = None

    def as_dict(self) -> dict:
        out = {"name": self.name, "sample_seconds": round(self.seconds, 1)}
        for key, s in self.scores.items():
            out[f"correct_{key}"] = round(s.value, 4)
            out[f"correct_{key}_ci"] = [round(v, 4) for v in s.interval]
            out[f"n_{key}"] = s.total
        if self.fd is not None:
            out["fd"] = round(self.fd[0], 2)
            out["fd_ci"] = [round(v, 2) for v in self.fd[1]]
        if self.train_seconds is not None:
            out["train_seconds"] = round(self.train_seconds, 1)
        return out


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def prepare_shards(out: Path, encoder, progress: bool = True, captions: int = 0) -> Path:
    """Prompt shards of the one-object training captions (the first `captions` of them, evenly spaced, when > 0)
    under out/prompts, reused when complete and made from the same captions."""
    from sid_fast.data.prepare import prepare_prompts
    from sid_fast.shapes.captions import caption_set

    shards = out / "prompts"
    pairs = caption_set(1, "train")
    if captions:
        pairs = [pairs[i * len(pairs) // captions] for i in range(min(captions, len(pairs)))]
    text = "\n".join(caption for caption, _ in pairs) + "\n"
    source = out / "train-1obj.txt"
    if (shards / "manifest.json").is_file() and source.is_file() and source.read_text() == text:
        _log(f"reusing prompt shards {shards}")
        return shards
    if shards.exists():
        _log(f"prompt shards in {shards} are incomplete or from other captions: preparing them again")
        shutil.rmtree(shards)
    source.write_text(text)
    _log(f"encoding {len(pairs)} training captions with MiniLM into {shards}")
    # 4 shards: enough readers for the loader's workers, few files
    prepare_prompts(source, shards, encoder, progress=progress, samples_per_shard=-(-len(pairs) // 4))
    return shards


def build_eval_set(objects: int, count: int, encoder, net, seed: int) -> EvalSet:
    from sid_fast.shapes.evaluate import heldout_prompts
    from sid_fast.shapes.features import features
    from sid_fast.shapes.world import render_batch, sample_scene

    pairs = heldout_prompts(objects, count, seed)
    captions, specs = [c for c, _ in pairs], [s for _, s in pairs]
    cond = encoder.encode(captions).to(dtype=torch.float32)
    truth = None
    if net is not None:
        rng = random.Random(seed + 17)
        truth = features(net, render_batch([sample_scene(spec, rng) for spec in specs]))
    return EvalSet(objects, captions, specs, cond, truth)


def build_eval_sets(prompts: int, two_object_prompts: int, encoder, net, seed: int) -> dict[int, EvalSet]:
    """The held-out sets every ShapesWorld score uses: `prompts` one-object prompts (with rendered-truth features
    when `net` is given) and, when `two_object_prompts` > 0, that many two-object prompts; keyed by object count."""
    sets = {1: build_eval_set(1, prompts, encoder, net, seed)}
    if two_object_prompts:
        sets[2] = build_eval_set(2, two_object_prompts, encoder, None, seed)
    return sets


def fd_chunks(prompts: int) -> int:
    """Chunks of the Fréchet-distance interval for `prompts` one-object prompts: about 60 per chunk, 2 to 5."""
    return max(2, min(5, prompts // 60))


def score_images(name: str, images: dict[int, Tensor], sets: dict[int, EvalSet], net, seconds: float,
                 chunks: int) -> Row:
    from sid_fast.shapes.checker import score
    from sid_fast.shapes.features import features, frechet_interval

    scores = {f"{objects}obj": score(images[objects], sets[objects].specs) for objects in images}
    fd = None
    if net is not None and sets[1].truth_features is not None:
        fd = frechet_interval(features(net, images[1]), sets[1].truth_features, chunks=chunks)
    return Row(name, scores, fd, seconds)


def save_generator(generator, path: Path, card: dict) -> Path:
    """A SiD generator (an SD3Adapter around the shapes transformer) in the shipped format (float16, config + card)."""
    from sid_fast.models.shapes import save_shapes_transformer

    return save_shapes_transformer(generator.transformer, path, torch.float16, card)


def load_generator(path: Path):
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import load_shapes_transformer, read_card

    return SD3Adapter(load_shapes_transformer(path)).eval().requires_grad_(False), read_card(path)


def load_run_generator(teacher_path: Path, path: Path):
    """A run's exported generator (`run_training`'s generator.safetensors, adapter names) as an eval-mode shapes
    generator built on the teacher's architecture (`sid_fast.adversarial.init_generator_from` matches the names)."""
    from sid_fast.adversarial import init_generator_from
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import load_shapes_transformer

    generator = SD3Adapter(load_shapes_transformer(teacher_path))
    init_generator_from(generator, path)
    return generator.eval().requires_grad_(False)


def fresh_config(out: Path, overrides: list[str], seed: int, full: bool, progress: bool = True) -> SiDConfig:
    """The fresh run's config (the demo preset + overrides), without its data.shards (set once they exist)."""
    config = load_config(PRESET, [f"train.out_dir={out / 'sid-fresh'}", f"train.seed={seed}"]
                         + ([] if progress else ["train.progress=false"]) + list(overrides))
    if full:
        config = load_config(overrides=[f"train.iterations={config.train.iterations * FULL_FACTOR}"], base=config)
    return config


FULL_FACTOR = 4
"""`--full` trains the fresh run for this many times the preset's iterations."""


def train_fresh(config: SiDConfig, progress: bool):
    from sid_fast.data import build_conditions
    from sid_fast.engine.build import build_engine
    from sid_fast.models.registry import build_teacher
    from sid_fast.trainer import SiDTrainer

    out = Path(config.train.out_dir)
    if out.exists():
        _log(f"starting the fresh run over: removing the previous one in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_yaml(config))
    bundle = build_teacher(config.teacher)
    bundle.conditions = build_conditions(config.data, None, config.train.seed)
    trainer = SiDTrainer(config, build_engine(config, bundle), bundle.conditions, bundle.sample_shape)
    start = time.perf_counter()
    trainer.fit()
    return trainer.engine.sampling_generator(ema=True), bundle, time.perf_counter() - start


def run(out_dir: str | Path = "runs/demo", overrides: list[str] | None = None, seed: int = 0, prompts: int = 200,
        two_object_prompts: int = 100, full: bool = False, progress: bool = True, captions: int = 0) -> dict:
    """Run the ShapesWorld demo; returns the results (also written to out_dir/results.json and report.md)."""
    from sid_fast.encoders.minilm import MiniLMEncoder
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import SHIPPED_TEACHER, load_shapes_transformer, read_card
    from sid_fast.shapes.evaluate import teacher_samples
    from sid_fast.shapes.features import SHIPPED_FEATURES, load_feature_net
    from sid_fast.shapes.grid import caption_grid

    torch.set_flush_denormal(True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = fresh_config(out, overrides or [], seed, full, progress)  # validate before any work
    teacher_path = Path(config.teacher.path) if config.teacher.path else SHIPPED_TEACHER
    if not teacher_path.is_file():
        raise FileNotFoundError(f"the ShapesWorld teacher {teacher_path} is missing (docs/shapes.md says how to make it)")
    encoder = MiniLMEncoder(max_length=config.teacher.max_sequence_length or 20)
    shards = prepare_shards(out, encoder, progress, captions)
    config = load_config(overrides=[f"data.shards={shards}"], base=config)
    net = load_feature_net(SHIPPED_FEATURES) if SHIPPED_FEATURES.is_file() else None
    if net is None:
        _log(f"no feature net at {SHIPPED_FEATURES}: reporting correctness only (no Fréchet distance)")
    sets = build_eval_sets(prompts, two_object_prompts, encoder, net, seed)
    uncond = encoder.unconditional().to(dtype=torch.float32)
    encoder.release()
    chunks = fd_chunks(prompts)
    guidance = float(read_card(teacher_path).get("guidance", 4.0)) if teacher_path.is_file() else 4.0
    teacher = SD3Adapter(load_shapes_transformer(teacher_path)).eval().requires_grad_(False)

    rows: list[Row] = []
    grids: dict[str, Tensor] = {}

    def record(name: str, sampler) -> Row:
        start = time.perf_counter()
        images = {objects: sampler(eval_set.cond, objects) for objects, eval_set in sets.items()}
        row = score_images(name, images, sets, net, time.perf_counter() - start, chunks)
        rows.append(row)
        grids[name] = images[1]
        _log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.scores.items())
             + (f", FD {row.fd[0]:.1f}" if row.fd else ""))
        return row

    for steps in TEACHER_STEPS:
        record(f"teacher Euler {steps}-step (CFG {guidance:g})",
               lambda cond, objects, steps=steps: teacher_samples(teacher, cond, uncond, steps, guidance, seed + objects,
                                                                   progress=progress))
    for k, path in REFERENCE_GENERATORS.items():
        if teacher_path.resolve() != SHIPPED_TEACHER.resolve():
            break  # the shipped generators were distilled from the shipped teacher only
        if path.is_file():
            generator, card = load_generator(path)
            record(f"shipped SiD {k}-step", lambda cond, objects, g=generator, k=k: _generator_images(g, cond, k, seed + objects))
        else:
            _log(f"no shipped reference generator {path.name} yet (docs/shapes.md)")

    _log(f"fresh SiD run: {config.method.num_steps}-step, {config.train.iterations} iterations of batch "
         f"{config.train.batch_size} ({'--full' if full else 'the demo budget'})")
    generator, _, train_seconds = train_fresh(config, progress)
    save_generator(generator, out / "sid-fresh" / "generator-fp16.safetensors",
                   {"made_by": "sid-fast demo", "iterations": config.train.iterations, "seed": seed})
    k = config.method.num_steps
    row = record(f"fresh SiD {k}-step (this run)", lambda cond, objects: _generator_images(generator, cond, k, seed + objects))
    row.train_seconds = train_seconds
    start_row = rows[0]  # the teacher's 1-step sampler = the generator's starting point
    verdict = gain_verdict(start_row, row)
    _log(verdict)

    paths = []
    captions = sets[1].captions
    for name, images in grids.items():
        path = out / f"grid-{_slug(name)}.png"
        from sid_fast.shapes.checker import check_batch

        verdicts = check_batch(images[:32], sets[1].specs[:32]).tolist()
        caption_grid(images[:32], captions[:32], path, columns=8, scale=3, verdicts=verdicts, title=name)
        paths.append((name, path))
    results = {"rows": [r.as_dict() for r in rows], "verdict": verdict, "prompts": prompts,
               "two_object_prompts": two_object_prompts, "seed": seed, "fd_chunks": chunks,
               "teacher": str(teacher_path), "feature_net": str(SHIPPED_FEATURES) if net is not None else None}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(rows)
    images_md = "\n\n".join(f"**{name}**\n\n![{name}]({path.name})" for name, path in paths)
    (out / "report.md").write_text(
        f"# sid-fast demo: SiD on the ShapesWorld text-to-image teacher\n\n{table}\n\n{verdict}\n\n"
        f"correct: fraction of images the exact attribute checker finds correct for their prompt (95% Wilson "
        f"interval), {prompts} held-out one-object prompts (1obj) and {two_object_prompts} held-out two-object prompts "
        f"(2obj). FD: Fréchet distance of the feature net's logits against rendered truth for the same one-object "
        f"prompts, mean over {chunks} chunks with a 95% t interval (compare only at equal n). Same prompts and "
        f"seeds for every sampler.\n\n{images_md}\n")
    print(table)
    print(f"\n{verdict}\nreport: {out / 'report.md'}")
    return results


@torch.no_grad()
def _generator_images(generator, cond: Conditioning, num_steps: int, seed: int) -> Tensor:
    from sid_fast.shapes.evaluate import generator_samples

    return generator_samples(generator, cond, num_steps, seed)


def gain_verdict(start: Row, fresh: Row) -> str:
    """Does the fresh run beat its starting point beyond the 95% intervals (correctness or FD)?"""
    s, f = start.scores["1obj"], fresh.scores["1obj"]
    better_correct = f.interval[0] > s.interval[1]
    better_fd = start.fd is not None and fresh.fd is not None and fresh.fd[1][1] < start.fd[1][0]
    if better_correct or better_fd:
        what = " and ".join(w for w, ok in (("correctness", better_correct), ("Fréchet distance", better_fd)) if ok)
        return f"gain: the fresh run beats its starting point (the teacher's 1-step sampler) on {what}, beyond the 95% intervals"
    return ("no gain beyond the 95% intervals over the starting point (the teacher's 1-step sampler) in this budget; "
            "try --full (docs/shapes.md)")


def compare_rows(a: Row, b: Row) -> str:
    """Whether row a beats row b beyond the 95% intervals on correctness (one-object) or FD."""
    better, worse = [], []
    sa, sb = a.scores["1obj"], b.scores["1obj"]
    if sa.interval[0] > sb.interval[1]:
        better.append("correctness")
    elif sa.interval[1] < sb.interval[0]:
        worse.append("correctness")
    if a.fd is not None and b.fd is not None:
        if a.fd[1][1] < b.fd[1][0]:
            better.append("Fréchet distance")
        elif a.fd[1][0] > b.fd[1][1]:
            worse.append("Fréchet distance")
    if not better and not worse:
        return f"{a.name} vs {b.name}: no difference beyond the 95% intervals"
    parts = ([f"better on {' and '.join(better)}"] if better else []) + ([f"worse on {' and '.join(worse)}"] if worse else [])
    return f"{a.name} vs {b.name}: {', '.join(parts)} (95% intervals separated)"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def format_table(rows: list[Row]) -> str:
    keys = list(rows[0].scores)
    header = "| sampler | " + " | ".join(f"correct {k}" for k in keys) + " | FD | sample s | train s |"
    lines = [header, "|" + "---|" * (len(keys) + 4)]
    for row in rows:
        cells = [f"{row.scores[k].value:.3f} [{row.scores[k].interval[0]:.2f}, {row.scores[k].interval[1]:.2f}]" for k in keys]
        fd = f"{row.fd[0]:.1f} [{row.fd[1][0]:.1f}, {row.fd[1][1]:.1f}]" if row.fd else "–"
        train = f"{row.train_seconds:.0f}" if row.train_seconds is not None else ""
        lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {fd} | {row.seconds:.0f} | {train} |")
    return "\n".join(lines)

