"""Learning curves of ShapesWorld distillations (docs/shapes.md, "Learning curves").

`Curve` is a trainer evaluator (`trainer.evaluator`, called every eval.every_images images): it samples the
generator on fixed held-out prompt sets with fixed noise — the same sets and seeds the reference rows are scored
with, so a run's last curve point and its final score agree — and appends one json line per evaluation: the step,
the training images seen, the exact checker's correctness per set (95% Wilson interval) and the feature-net
Fréchet distance (95% t interval over chunks), of the EMA generator and, with raw=True, of the raw weights.
`start` scores the starting point (step 0) once; a resumed run appends to the same file. With `best_dir`, the
generator with the lowest FD so far (EMA, and raw with raw=True) is kept as `best_dir/best-{ema,raw}.safetensors` in
the shipped float16 format, its step and scores in the card (chosen on the held-out prompts it is scored on: score
it again on other prompts, e.g. `launchers/shapes_reference.py --seed 1 --from K=FILE`, before quoting it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class Curve:
    def __init__(self, sets: dict, net, num_steps: int, seed: int, path: str | Path, label: str, chunks: int,
                 raw: bool = False, best_dir: str | Path | None = None):
        self.sets, self.net, self.num_steps, self.seed = sets, net, num_steps, seed
        self.path, self.label, self.chunks, self.raw = Path(path), label, chunks, raw
        self.best_dir = Path(best_dir) if best_dir is not None else None
        self.started = time.perf_counter()

    def _keep_if_best(self, kind: str, generator, trainer, scores: dict) -> None:
        from sid_fast.demo.shapes import save_generator
        from sid_fast.models.shapes import read_card

        if self.best_dir is None or "fd" not in scores:
            return
        path = self.best_dir / f"best-{kind}.safetensors"
        if path.is_file() and read_card(path)["scores"]["fd"] <= scores["fd"]:
            return
        self.best_dir.mkdir(parents=True, exist_ok=True)
        card = {"made_by": f"sid_fast.demo.curve.Curve ({self.label}): the {kind} generator with the lowest held-out "
                           f"FD of the run so far", "num_steps": self.num_steps, "step": trainer.step,
                "images_seen": trainer.images_seen, "weights": kind, "scores": scores, "seed": self.seed}
        save_generator(generator, path, card)  # written under a temporary name and renamed

    def logged_steps(self) -> set[int]:
        """Steps this label already has rows for in the curve file (a resumed run does not repeat them)."""
        if not self.path.is_file():
            return set()
        rows = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
        return {row["step"] for row in rows if row.get("label") == self.label}

    def score(self, generator) -> dict:
        """Scores of `generator` on the sets (keys of `sid_fast.demo.shapes.Row.as_dict`, less name and seconds)."""
        from sid_fast.demo.shapes import _generator_images, score_images

        was_training = generator.training
        generator.eval()
        images = {objects: _generator_images(generator, s.cond, self.num_steps, self.seed + objects)
                  for objects, s in self.sets.items()}
        generator.train(was_training)
        row = score_images("curve", images, self.sets, self.net, 0.0, self.chunks).as_dict()
        return {k: v for k, v in row.items() if k not in ("name", "sample_seconds")}

    def start(self, trainer) -> None:
        """The starting point (step 0), unless the file has it already (a resumed run)."""
        if 0 not in self.logged_steps():
            self.evaluate(trainer)

    def evaluate(self, trainer) -> dict:
        start = time.perf_counter()
        out = {}
        for kind in ("ema", "raw") if self.raw else ("ema",):
            generator = trainer.engine.sampling_generator(ema=kind == "ema")
            scores = self.score(generator)
            self._keep_if_best(kind, generator, trainer, scores)
            out.update({(k if kind == "ema" else f"raw_{k}"): v for k, v in scores.items()})
        entry = {"label": self.label, "step": trainer.step, "images_seen": trainer.images_seen,
                 "seconds": round(time.perf_counter() - self.started, 1),
                 "eval_seconds": round(time.perf_counter() - start, 1), **out}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        print(f"[curve] {json.dumps(entry)}", flush=True)
        return {"curve_correct_1obj": out.get("correct_1obj"), **({"curve_fd": out["fd"]} if "fd" in out else {})}
