"""The SiD loop (DESIGN.md §2–§4): the method + models + an engine + a condition source.

One iteration = one fake-score update, then one generator update, each on a fresh batch (§3).
The trainer knows nothing of how the engine holds the networks (one process or DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from sid_fast.config import SiDConfig, to_dict
from sid_fast.flow import interpolate, sample_time, velocity_to_x0
from sid_fast.guidance import guided_velocity
from sid_fast.losses import fake_score_loss, loss_weight, sid_generator_loss
from sid_fast.models.protocol import ConditionSource
from sid_fast.sampler import few_step_sample


class NonFiniteError(FloatingPointError):
    """A loss or tensor became NaN/inf; the message names the step, network and tensor."""


@dataclass
class StepStats:
    step: int
    steps_run: int
    loss_fake: float
    loss_generator: float | None
    grad_norm_fake: float | None = None
    grad_norm_generator: float | None = None


def _check_finite(value: Tensor, step: int, network: str, tensor: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"step {step}: non-finite {tensor} in the {network} update ({value.detach().flatten()[:4].tolist()})")


class SiDTrainer:
    """Distils `engine.teacher` into `engine.generator` with SiD.

    sample_shape: the per-sample latent shape (without batch), e.g. (2,) or (16, 64, 64).
    conditions: a `ConditionSource` (class labels, prompt shards, ...).
    """

    def __init__(self, config: SiDConfig, engine, conditions: ConditionSource, sample_shape: tuple[int, ...]):
        self.config = config
        self.engine = engine
        self.conditions = conditions
        self.sample_shape = tuple(sample_shape)
        self.device = engine.device
        self.rng = torch.Generator(device=self.device).manual_seed(config.train.seed + 7919 * engine.rank)
        self.step = 0
        self.images_seen = 0
        self.out_dir = Path(config.train.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.history: list[dict] = []

    # ------------------------------------------------------------------ random draws

    def steps_for_iteration(self, step: int) -> int:
        """K' for this iteration: U{1..K} from a stream seeded by (seed, step), identical on all ranks."""
        method = self.config.method
        if not method.random_steps or method.num_steps == 1:
            return method.num_steps
        g = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + step)
        return int(torch.randint(1, method.num_steps + 1, (1,), generator=g))

    def _noise(self, batch: int) -> Tensor:
        return torch.randn((batch, *self.sample_shape), generator=self.rng, device=self.device)

    def _times(self, batch: int) -> Tensor:
        tc = self.config.method.time
        return sample_time(batch, tc.scheme, mean=tc.mean, std=tc.std, shift=tc.shift, t_min=tc.t_min,
                           t_max=tc.t_max, generator=self.rng, device=self.device)

    def _batch(self):
        batch = self.config.train.batch_size
        cond = self.conditions.sample(batch, self.rng).to(self.device)
        uncond = self.conditions.unconditional(batch).to(self.device)
        return cond, uncond

    def _generate(self, cond, steps_run: int, grad: bool) -> Tensor:
        method = self.config.method
        z = self._noise(len(cond))
        return few_step_sample(self.engine.generator, z, cond, method.num_steps, steps_to_run=steps_run,
                               t_init=method.t_init, noise=method.noise, rng=self.rng, grad_last=grad)

    # ------------------------------------------------------------------ the two updates

    def fake_score_loss(self, steps_run: int) -> Tensor:
        """§3 fake-score step: regress CFG_κ1[v_ψ] onto ε − x_g at x_t from generator samples."""
        cond, uncond = self._batch()
        with torch.no_grad():
            x_g = self._generate(cond, steps_run, grad=False)
        noise, t = self._noise(x_g.shape[0]), self._times(x_g.shape[0])
        x_t = interpolate(x_g, noise, t)
        velocity = guided_velocity(self.engine.fake_score, x_t, t, cond, uncond, self.config.method.kappa_fake_loss)
        return fake_score_loss(velocity, x_g, noise).mean()

    def generator_loss(self, steps_run: int) -> Tensor:
        """§3 generator step: gradient through x_g, and through x_t into teacher and fake score (inputs only)."""
        method = self.config.method
        cond, uncond = self._batch()
        x_g = self._generate(cond, steps_run, grad=True)
        noise, t = self._noise(x_g.shape[0]), self._times(x_g.shape[0])
        x_t = interpolate(x_g, noise, t)
        with self.engine.frozen("fake_score"):
            velocity_teacher = guided_velocity(self.engine.teacher, x_t, t, cond, uncond, method.kappa_teacher)
            velocity_fake = guided_velocity(self.engine.fake_score, x_t, t, cond, uncond, method.kappa_fake_gen)
        x0_teacher = velocity_to_x0(x_t, t, velocity_teacher) if method.weighting == "sid" else None
        weight = loss_weight(method.weighting, t, x_g=x_g, x0_teacher=x0_teacher)
        loss = sid_generator_loss(x_t, t, x_g, velocity_teacher, velocity_fake, weight, method.alpha, method.loss_scale)
        return loss.mean()

    def train_step(self) -> StepStats:
        """One SiD iteration: `grad_accum` fake-score micro-batches then `grad_accum` generator micro-batches."""
        step, accum = self.step, self.config.train.grad_accum
        steps_run = self.steps_for_iteration(step)
        fake_total, gen_total, stats_fake, stats_gen = 0.0, None, {}, {}
        for _ in range(accum):
            loss = self.fake_score_loss(steps_run)
            _check_finite(loss, step, "fake_score", "fake-score loss")
            self.engine.backward("fake_score", loss)
            stats_fake = self.engine.step("fake_score") or stats_fake
            fake_total += loss.item() / accum
        if step >= self.config.train.fake_warmup_iters:
            gen_total = 0.0
            for _ in range(accum):
                loss = self.generator_loss(steps_run)
                _check_finite(loss, step, "generator", "SiD generator loss")
                self.engine.backward("generator", loss)
                stats_gen = self.engine.step("generator") or stats_gen
                gen_total += loss.item() / accum
            self.engine.ema_update()
        self.step += 1
        self.images_seen += 2 * accum * self.config.train.batch_size * self.engine.world_size
        return StepStats(self.step, steps_run, fake_total, gen_total, stats_fake.get("grad_norm"), stats_gen.get("grad_norm"))

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen, "conditions": self.conditions.state_dict(),
                "config": to_dict(self.config)}

    def save(self) -> Path:
        return save_checkpoint(self.ckpt_root, self.step, self.engine, self.state(), rng_state(self.rng),
                               keep=self.config.train.keep_checkpoints)

    def resume(self, directory: Path | None = None) -> bool:
        """Restore from `directory` or the latest checkpoint in out_dir; False when there is none."""
        directory = directory or latest_checkpoint(self.ckpt_root)
        if directory is None:
            return False
        state = load_checkpoint(directory, self.engine, self.rng)
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.conditions.load_state_dict(state["conditions"])
        return True

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.engine.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def fit(self, iterations: int | None = None) -> list[dict]:
        """Run until `iterations` total iterations (default config.train.iterations); checkpoint as configured."""
        train = self.config.train
        total = train.iterations if iterations is None else iterations
        if train.resume and self.step == 0:
            self.resume()
        bar = None
        if train.progress and self.engine.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="SiD", unit="it", dynamic_ncols=True)
        window_start, window_images = time.perf_counter(), self.images_seen
        while self.step < total:
            stats = self.train_step()
            if bar is not None:
                bar.update(1)
                post = {"fake": f"{stats.loss_fake:.4g}", "K'": stats.steps_run}
                if stats.loss_generator is not None:
                    post["gen"] = f"{stats.loss_generator:.4g}"
                bar.set_postfix(post, refresh=False)
            if self.step % train.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                record = {k: v for k, v in vars(stats).items() if v is not None}
                record["images_seen"] = self.images_seen
                record["images_per_s"] = (self.images_seen - window_images) / max(elapsed, 1e-9)
                self._log(record)
                window_start, window_images = time.perf_counter(), self.images_seen
            if train.ckpt_every and self.step % train.ckpt_every == 0 and self.step < total:
                self.save()
        if bar is not None:
            bar.close()
        if total > 0:
            self.save()
        return self.history
