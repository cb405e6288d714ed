"""The SiD loop (DESIGN.md §2–§4): the method + models + an engine + a condition source.

One iteration = one fake-score update, then one generator update, each on a fresh batch (§3).
The trainer knows nothing of how the engine holds the networks (one process or DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.checkpoint import LATEST, CheckpointError, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from sid_fast.config import SiDConfig, to_dict
from sid_fast.flow import interpolate, sample_time, velocity_to_x0
from sid_fast.guidance import combine_cfg, guided_velocity
from sid_fast.health import CollapseMonitor, FlopCounter, LogSinks, NonFiniteError, NonFiniteGuard, memory_stats
from sid_fast.kernels import cfg_fake_score_loss, cfg_sid_generator_loss
from sid_fast.kernels.attention import apply_attention_backend
from sid_fast.kernels.blocks import apply_block_kernels
from sid_fast.kernels.ops import check_loss_backend, guided_velocity_split, resolve_loss_backend
from sid_fast.losses import fake_score_loss, loss_weight, sid_generator_loss
from sid_fast.models.protocol import ConditionSource
from sid_fast.sampler import few_step_sample


@dataclass
class StepStats:
    """One iteration's scalars. Inside `fit` they stay 0-dim device tensors until a log line needs them
    (`resolved()` reads them all in one host transfer); `train_step()` returns them resolved to floats."""

    step: int
    steps_run: int
    loss_fake: float | Tensor
    loss_generator: float | Tensor | None
    grad_norm_fake: float | Tensor | None = None
    grad_norm_generator: float | Tensor | None = None
    teacher_fake_mse: float | Tensor | None = None
    """Mean squared distance between the teacher's and the fake score's guided velocities (generator step)."""
    skipped: str | None = None
    """Networks whose update was skipped for NaN/inf (health.on_nonfinite=skip)."""
    loss_d: float | Tensor | None = None
    """SiD²ₐ: the discriminator loss of the fake-score step."""
    loss_adv: float | Tensor | None = None
    """SiD²ₐ: the adversarial generator loss (once it is on)."""

    def resolved(self) -> StepStats:
        """A copy with every tensor field read to a float, all in one device-to-host transfer."""
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]
        if not names:
            return self
        device = getattr(self, names[0]).device
        values = torch.stack([getattr(self, n).detach().float().reshape(()).to(device) for n in names])
        out = StepStats(**{f.name: getattr(self, f.name) for f in fields(self)})
        for name, value in zip(names, values.tolist(), strict=True):
            setattr(out, name, value)
        return out


__all__ = ["NonFiniteError", "SiDTrainer", "StepStats"]


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
        health = config.health
        if health.on_nonfinite == "skip" and config.train.grad_accum != 1:
            raise ValueError("config field health.on_nonfinite: `skip` drops a whole update, which needs "
                             f"train.grad_accum=1 (got {config.train.grad_accum}); use `stop` with accumulation")
        self.guard = NonFiniteGuard(health.on_nonfinite, health.check_tensors, engine, deferred=health.defer_checks)
        self.sinks = LogSinks(self.out_dir, health.tensorboard, health.wandb_project, to_dict(config)) if engine.rank == 0 else None
        self.flops = FlopCounter({"teacher": engine.teacher, "fake_score": engine.fake_score, "generator": engine.generator})
        self.collapse = CollapseMonitor(health.collapse_ratio) if health.collapse_every else None
        self.evaluator = None
        """An `sid_fast.eval.inloop.InLoopEvaluator`, run every eval.every_images images when set."""
        self._teacher_fake_mse: list[Tensor] = []
        self._uncond = None
        check_loss_backend(config.kernels.loss_backend)
        self.loss_backend = resolve_loss_backend(config.kernels.loss_backend, self.device, self._velocity_dtype())
        """The fused-loss backend in use (kernels.loss_backend, `auto` resolved for this device and dtype)."""
        apply_attention_backend([engine.teacher, engine.fake_score, engine.generator], config.kernels.attention)
        apply_block_kernels([engine.teacher, engine.fake_score, engine.generator], config.kernels.block_backend)
        if config.kernels.compile:  # after the kernels and processors are in place: they are part of the graph
            from sid_fast.kernels.regional_compile import compile_regions

            compile_regions({"teacher": engine.teacher, "fake_score": engine.fake_score, "generator": engine.generator},
                            config.kernels.compile_mode, config.kernels.compile_backend)

    def _velocity_dtype(self) -> torch.dtype:
        """The dtype of the networks' outputs that the losses read: the autocast dtype, else the fake score's."""
        if self.config.train.autocast != "off":
            return getattr(torch, self.config.train.autocast)
        return next((p.dtype for p in self.engine.fake_score.parameters()), torch.float32)

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
        cond = self.conditions.sample(batch, self.rng).to(self.device, non_blocking=True)
        if self._uncond is None or len(self._uncond) != batch:  # the same every step: moved once
            self._uncond = self.conditions.unconditional(batch).to(self.device)
        return cond, self._uncond

    def _generate(self, cond, steps_run: int, grad: bool) -> Tensor:
        method = self.config.method
        z = self._noise(len(cond))
        return few_step_sample(self.engine.generator, z, cond, method.num_steps, steps_to_run=steps_run,
                               t_init=method.t_init, noise=method.noise, rng=self.rng, grad_last=grad)

    # ------------------------------------------------------------------ the two updates

    def _fake_batch(self, steps_run: int) -> dict:
        """Fresh prompts, generator samples x_g (no grad), ε, t and x_t for the fake-score step (§3)."""
        cond, uncond = self._batch()
        with torch.no_grad():
            x_g = self._generate(cond, steps_run, grad=False)
        self.guard.watch(x_g, "generator", "sample x_g (fake-score step)")
        noise, t = self._noise(x_g.shape[0]), self._times(x_g.shape[0])
        return dict(cond=cond, uncond=uncond, x_g=x_g, noise=noise, t=t, x_t=interpolate(x_g, noise, t))

    def fake_score_loss(self, steps_run: int) -> Tensor:
        """§3 fake-score step: regress CFG_κ1[v_ψ] onto ε − x_g at x_t from generator samples."""
        return self._fake_score_loss_on(**self._fake_batch(steps_run))

    def _fake_score_loss_on(self, cond, uncond, x_g: Tensor, noise: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        kappa, backend = self.config.method.kappa_fake_loss, self.loss_backend
        if backend != "torch":  # fused op (sid_fast.kernels): the CFG combination happens inside the kernel
            velocity_uncond, velocity_cond, kappa = guided_velocity_split(self.engine.fake_score, x_t, t, cond, uncond, kappa)
            self.guard.watch(velocity_cond, "fake_score", "conditional velocity")
            return cfg_fake_score_loss(velocity_uncond, velocity_cond, kappa, x_g, noise, backend=backend).mean()
        velocity = guided_velocity(self.engine.fake_score, x_t, t, cond, uncond, kappa)
        self.guard.watch(velocity, "fake_score", "guided velocity (κ1)")
        return fake_score_loss(velocity, x_g, noise).mean()

    def _generator_batch(self, steps_run: int) -> dict:
        """Fresh prompts, x_g with grad through the last generator call, ε, t and x_t (§3 generator step)."""
        cond, uncond = self._batch()
        x_g = self._generate(cond, steps_run, grad=True)
        self.guard.watch(x_g, "generator", "sample x_g")
        noise, t = self._noise(x_g.shape[0]), self._times(x_g.shape[0])
        return dict(cond=cond, uncond=uncond, x_g=x_g, noise=noise, t=t, x_t=interpolate(x_g, noise, t))

    def generator_loss(self, steps_run: int) -> Tensor:
        """§3 generator step: gradient through x_g, and through x_t into teacher and fake score (inputs only)."""
        return self._sid_generator_loss_on(**self._generator_batch(steps_run))

    def _sid_generator_loss_on(self, cond, uncond, x_g: Tensor, noise: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        method = self.config.method
        if self.loss_backend != "torch":
            return self._fused_generator_loss(x_t, t, x_g, cond, uncond)
        with self.engine.frozen("fake_score"):
            velocity_teacher = guided_velocity(self.engine.teacher, x_t, t, cond, uncond, method.kappa_teacher)
            velocity_fake = guided_velocity(self.engine.fake_score, x_t, t, cond, uncond, method.kappa_fake_gen)
        self._watch_pair(velocity_teacher, velocity_fake)
        x0_teacher = velocity_to_x0(x_t, t, velocity_teacher) if method.weighting == "sid" else None
        weight = loss_weight(method.weighting, t, x_g=x_g, x0_teacher=x0_teacher)
        loss = sid_generator_loss(x_t, t, x_g, velocity_teacher, velocity_fake, weight, method.alpha, method.loss_scale)
        return loss.mean()

    def _fused_generator_loss(self, x_t: Tensor, t: Tensor, x_g: Tensor, cond, uncond) -> Tensor:
        """The generator loss through the fused op of `kernels.loss_backend`, fed the uncond/cond velocity pairs."""
        method = self.config.method
        with self.engine.frozen("fake_score"):
            teacher_u, teacher_c, kappa_teacher = guided_velocity_split(self.engine.teacher, x_t, t, cond, uncond,
                                                                        method.kappa_teacher)
            fake_u, fake_c, kappa_fake = guided_velocity_split(self.engine.fake_score, x_t, t, cond, uncond,
                                                               method.kappa_fake_gen)
        self._watch_pair(teacher_c, fake_c)
        x0_teacher = None
        if method.weighting == "sid":
            x0_teacher = velocity_to_x0(x_t, t, combine_cfg(teacher_u.float(), teacher_c.float(), kappa_teacher))
        weight = loss_weight(method.weighting, t, x_g=x_g, x0_teacher=x0_teacher)
        loss = cfg_sid_generator_loss(x_t, t, x_g, teacher_u, teacher_c, fake_u, fake_c, kappa_teacher, kappa_fake,
                                      weight, method.alpha, method.loss_scale, backend=self.loss_backend)
        return loss.mean()

    def _watch_pair(self, velocity_teacher: Tensor, velocity_fake: Tensor) -> None:
        """NaN/inf checks of teacher and fake outputs, and their distance (a health signal, no grad)."""
        self.guard.watch(velocity_teacher, "teacher", "guided velocity (κ4)")
        self.guard.watch(velocity_fake, "fake_score", "guided velocity (κ2)")
        with torch.no_grad():
            # kept on the device: read once at the end of the step, not between forward and backward
            self._teacher_fake_mse.append((velocity_teacher.float() - velocity_fake.float()).square().mean())

    def generator_active(self, step: int) -> bool:
        """Whether iteration `step` updates the generator (after train.fake_warmup_iters)."""
        return step >= self.config.train.fake_warmup_iters

    def train_step(self) -> StepStats:
        """One SiD iteration (see `_train_step`), its scalars read to floats (one host sync)."""
        stats = self._train_step()
        self.guard.flush()
        return stats.resolved()

    def _autocast(self):
        """bf16/fp16 autocast of the network forwards (train.autocast); the losses cast to fp32 themselves."""
        mode = self.config.train.autocast
        if mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, mode))

    def _train_step(self) -> StepStats:
        """One SiD iteration: `train.fake_updates` fake-score updates, then one generator update; each update is
        `grad_accum` micro-batches. With health.defer_checks the scalars stay on the device (no host sync)."""
        step, accum = self.step, self.config.train.grad_accum
        steps_run = self.steps_for_iteration(step)
        self.guard.step = step
        fake_total, gen_total, stats_fake, stats_gen, skipped = 0.0, None, {}, {}, []
        self._teacher_fake_mse = []
        for _ in range(self.config.train.fake_updates):  # the logged fake loss is that of the last update
            fake_total = 0.0
            for _ in range(accum):
                with self._autocast():
                    loss = self.fake_score_loss(steps_run)
                if self.guard.verdict(loss, step, "fake_score", "fake-score loss"):  # stop raises; skip: no update
                    skipped.append("fake_score")
                    fake_total = float("nan")
                    break
                self.engine.backward("fake_score", loss)
                stats_fake = self.engine.step("fake_score") or stats_fake
                fake_total = fake_total + loss.detach() / accum
            if skipped:
                break
        if self.generator_active(step):
            gen_total = 0.0
            for _ in range(accum):
                with self._autocast():
                    loss = self.generator_loss(steps_run)
                if self.guard.verdict(loss, step, "generator", "generator loss"):
                    skipped.append("generator")
                    gen_total = float("nan")
                    break
                self.engine.backward("generator", loss)
                stats_gen = self.engine.step("generator") or stats_gen
                gen_total = gen_total + loss.detach() / accum
            else:
                self.engine.ema_update()
        self.step += 1
        self.images_seen += self.config.train.images_per_iteration(self.engine.world_size)
        distance = torch.stack(self._teacher_fake_mse).mean() if self._teacher_fake_mse else None
        return StepStats(self.step, steps_run, fake_total, gen_total, stats_fake.get("grad_norm"), stats_gen.get("grad_norm"),
                         distance, ",".join(skipped) or None)

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
        try:
            state = load_checkpoint(directory, self.engine, self.rng)
        except CheckpointError as error:
            others = sorted(p.name for p in self.ckpt_root.glob("step-*") if p != Path(directory))
            hint = (f"; other checkpoints in {self.ckpt_root}: {others} (to resume one, write its name into "
                    f"{self.ckpt_root / LATEST}, or call SiDTrainer.resume(directory))") if others else ""
            raise CheckpointError(f"{error}{hint}") from None
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.conditions.load_state_dict(state["conditions"])
        return True

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.sinks is not None:
            self.sinks.write(record)

    def _health_record(self, record: dict, elapsed: float) -> None:
        """Adds memory, analytic FLOP rate / MFU and (every health.collapse_every) the diversity check."""
        health = self.config.health
        record.update(memory_stats(self.device))
        flops = self.flops.take()
        if flops > 0:
            record["tflops_per_s"] = flops / max(elapsed, 1e-9) / 1e12
            if health.peak_tflops > 0:
                record["mfu"] = record["tflops_per_s"] / health.peak_tflops

    def _check_collapse(self) -> dict:
        """Mean pairwise distance of a fixed-seed generator batch (health.collapse_every); warns when it falls."""
        health, method = self.config.health, self.config.method
        rng = torch.Generator(device=self.device).manual_seed(self.config.train.seed + 424242)
        cond = self.conditions.unconditional(health.collapse_batch).to(self.device)
        z = torch.randn((health.collapse_batch, *self.sample_shape), generator=rng, device=self.device)
        with torch.no_grad():
            samples = few_step_sample(self.engine.sampling_generator(ema=True), z, cond, method.num_steps,
                                      t_init=method.t_init, noise=method.noise, rng=rng)
        return self.collapse.update(samples, self.step)

    def fit(self, iterations: int | None = None) -> list[dict]:
        """Run until `iterations` total iterations (default config.train.iterations); checkpoint as configured."""
        train = self.config.train
        total = train.iterations if iterations is None else iterations
        if train.resume and self.step == 0:
            self.resume()
        bar = None
        if train.progress and self.engine.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="SiD", unit="it", dynamic_ncols=True, mininterval=1.0)
        window_start, window_images = time.perf_counter(), self.images_seen
        self._evaluated = self.images_seen // self.config.eval.every_images if self.config.eval.every_images else 0
        self.flops.take()
        while self.step < total:
            stats = self._train_step()  # scalars stay on the device: no host sync until the log line
            if bar is not None:
                bar.update(1)
            if self.step % train.log_every == 0 or self.step == total:
                self.guard.flush()  # deferred NaN/inf checks of the window: raises naming the first bad step
                stats = stats.resolved()
                if bar is not None:
                    post = {"fake": f"{stats.loss_fake:.4g}", "K'": stats.steps_run}
                    if stats.loss_generator is not None:
                        post["gen"] = f"{stats.loss_generator:.4g}"
                    post["img/s"] = f"{(self.images_seen - window_images) / max(time.perf_counter() - window_start, 1e-9):.0f}"
                    bar.set_postfix(post, refresh=False)
                elapsed = time.perf_counter() - window_start
                record = {k: v for k, v in vars(stats).items() if v is not None}
                record["images_seen"] = self.images_seen
                record["images_per_s"] = (self.images_seen - window_images) / max(elapsed, 1e-9)
                self._health_record(record, elapsed)
                if self.collapse is not None and self.step % self.config.health.collapse_every == 0:
                    record.update(self._check_collapse())
                self._log(record)
                window_start, window_images = time.perf_counter(), self.images_seen
            if train.ckpt_every and self.step % train.ckpt_every == 0 and self.step < total:
                self.guard.flush()  # never checkpoint weights past a non-finite step
                self.save()
            every = self.config.eval.every_images
            if self.evaluator is not None and every and self.images_seen // every > self._evaluated:
                self.guard.flush()
                self._evaluated = self.images_seen // every
                self._log({"step": self.step, "images_seen": self.images_seen, **self.evaluator.evaluate(self)})
        self.guard.flush()
        if bar is not None:
            bar.close()
        if self.sinks is not None:
            self.sinks.close()
        if total > 0:
            self.save()
        return self.history
