"""In-loop evaluation: every `eval.every_images` images, sample a fixed prompt set with fixed seeds (§6: K steps,
fresh noise, no CFG), write a PNG grid, compute the configured metric, and keep the best-by-metric generator
weights under `out_dir/best/` beside the trainer's latest checkpoint.

Retention (`BestCheckpoints`): `index.json` lists the kept files best first; a new result is written only when
it enters the best `keep`, then the ones that fall out are deleted. A non-finite metric is never kept. Since
keep ≥ 1 and a file is deleted only when a better one replaced it, the only checkpoint is never deleted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.models.protocol import Conditioning
from sid_fast.sampler import few_step_sample


class BestCheckpoints:
    """Keeps the `keep` best generator files under `root` by a metric (lower is better unless higher_is_better)."""

    def __init__(self, root: str | Path, keep: int, higher_is_better: bool = False):
        if keep < 1:
            raise ValueError(f"config field eval.keep_best: must be >= 1, got {keep}")
        self.root, self.keep, self.higher = Path(root), keep, higher_is_better
        self.index_path = self.root / "index.json"
        self.entries: list[dict] = json.loads(self.index_path.read_text()) if self.index_path.is_file() else []

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.higher else a < b

    def would_keep(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return len(self.entries) < self.keep or self._better(value, self.entries[-1]["value"])

    def offer(self, step: int, value: float, write) -> bool:
        """Keep `step` when `value` ranks in the best `keep`: `write(path)` writes the weights. Returns kept."""
        if not self.would_keep(value):
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}.safetensors"
        tmp = self.root / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, self.root / name)
        entries = [e for e in self.entries if e["file"] != name] + [{"step": step, "value": float(value), "file": name}]
        entries.sort(key=lambda e: -e["value"] if self.higher else e["value"])
        kept, dropped = entries[: self.keep], entries[self.keep:]
        self._write_index(kept)
        for entry in dropped:  # only ever files that a better, already written one replaced
            (self.root / entry["file"]).unlink(missing_ok=True)
        self.entries = kept
        return True

    def _write_index(self, entries: list[dict]) -> None:
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.index_path)

    def files(self) -> list[Path]:
        return [self.root / e["file"] for e in self.entries]


def fixed_noise(count: int, start: int, shape: tuple[int, ...], seed: int, device) -> Tensor:
    """(count, *shape) noise where sample i uses its own seed (seed + start + i): independent of the rank split."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i)) for i in range(count)]
    return torch.stack(rows).to(device)


def image_grid(images_bhwc, columns: int = 8):
    """(B, H, W, 3) uint8 numpy -> one (rows·H, columns·W, 3) uint8 grid."""
    import numpy as np

    b, h, w, c = images_bhwc.shape
    columns = min(columns, b)
    rows = -(-b // columns)
    grid = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = images_bhwc[i]
    return grid


class InLoopEvaluator:
    """Samples `prompts` (a fixed Conditioning of eval.num_samples) with fixed seeds and scores them.

    metric: has `update(samples)` (or `update(images, prompts)` when its `uses_prompts` is true: CLIP, ShapesWorld,
    given `prompt_texts`) and `compute()`, computed over all ranks; after `compute` an optional `details` dict is
    logged as `eval_<metric>_<key>`. Best checkpoints follow the metric's `higher_is_better` (else
    `HIGHER_IS_BETTER[eval.metric]`). decode: latents -> images in [-1, 1] (None: the samples themselves).
    `sid_fast.eval.build.build_evaluator` makes one from the config.
    """

    def __init__(self, config, prompts: Conditioning, metric, decode=None, prompt_texts: list[str] | None = None):
        from sid_fast.eval.metrics import HIGHER_IS_BETTER

        ev = config.eval
        if len(prompts) != ev.num_samples:
            raise ValueError(f"config field eval.num_samples: {ev.num_samples}, but the prompt set has {len(prompts)}")
        if prompt_texts is not None and len(prompt_texts) != ev.num_samples:
            raise ValueError(f"config field eval.num_samples: {ev.num_samples}, but {len(prompt_texts)} prompt texts")
        self.uses_prompts = getattr(metric, "uses_prompts", prompt_texts is not None)
        if self.uses_prompts and prompt_texts is None:
            raise ValueError(f"config field eval.metric: {ev.metric} scores images against their prompt texts, "
                             "and this prompt set has none")
        self.config, self.prompts, self.metric, self.decode, self.prompt_texts = config, prompts, metric, decode, prompt_texts
        higher = getattr(metric, "higher_is_better", HIGHER_IS_BETTER.get(ev.metric, False))
        self.best = BestCheckpoints(Path(config.train.out_dir) / "best", ev.keep_best, higher_is_better=higher)

    def evaluate(self, trainer) -> dict:
        ev, method, engine = self.config.eval, self.config.method, trainer.engine
        if ev.num_samples % engine.world_size:
            raise ValueError(f"config field eval.num_samples: {ev.num_samples} does not split over {engine.world_size} ranks")
        per_rank = ev.num_samples // engine.world_size
        start = engine.rank * per_rank
        cond = self.prompts[start:start + per_rank].to(engine.device)
        z = fixed_noise(per_rank, start, trainer.sample_shape, ev.seed, engine.device)
        rng = torch.Generator(device=engine.device).manual_seed(ev.seed + 7 * engine.rank)
        with torch.no_grad():
            samples = few_step_sample(engine.sampling_generator(ema=True), z, cond, method.num_steps,
                                      t_init=method.t_init, noise=method.noise, rng=rng)
            images = self.decode(samples) if self.decode is not None else samples
        if self.uses_prompts:
            self.metric.update(images, self.prompt_texts[start:start + per_rank])
        else:
            self.metric.update(images)
        value = self.metric.compute()  # all ranks: the same reduced value
        record = {f"eval_{ev.metric}": value}
        record.update({f"eval_{ev.metric}_{key}": item for key, item in (getattr(self.metric, "details", None) or {}).items()})
        if engine.rank == 0 and ev.grid:
            record["eval_grid"] = str(self._write_grid(images[: ev.grid], trainer))
        if self.best.would_keep(value):
            state = engine.generator_state_dict(ema=True)  # collective under ZeRO-3

            def write(path: Path) -> None:
                from safetensors.torch import save_file

                save_file(state, str(path))

            if engine.rank == 0:
                self.best.offer(trainer.step, value, write)
            else:  # keep the other ranks' view of the index in step
                self.best.entries = sorted(self.best.entries + [{"step": trainer.step, "value": value,
                                                                 "file": f"step-{trainer.step:08d}.safetensors"}],
                                           key=lambda e: -e["value"] if self.best.higher else e["value"])[: self.best.keep]
            record["eval_kept"] = True
        engine.barrier()
        return record

    def _write_grid(self, images: Tensor, trainer) -> Path:
        out = Path(self.config.train.out_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step-{trainer.step:08d}.png"
        if images.ndim == 2:  # vector samples (toy): a scatter of the first two coordinates
            from sid_fast.eval.plots import scatter_panels

            return scatter_panels({f"step {trainer.step}": images[:, :2].float().cpu()}, path)
        from PIL import Image

        from sid_fast.eval.metrics import to_uint8_images

        grid = image_grid(to_uint8_images(images))
        Image.fromarray(grid).save(path)
        if trainer.sinks is not None:
            trainer.sinks.image("eval/grid", grid, trainer.step)
        return path
