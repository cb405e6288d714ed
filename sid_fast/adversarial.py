"""Data-aided SiD²ₐ (DESIGN.md §5): the fake score network as discriminator, real latents, warm-up schedule.

The discriminator feature is captured by a forward pre-hook on the model's `feature_module()` (the output
projection of a DiT adapter; the last layer of a VelocityMLP): its input is the token sequence after the final
adaptive norm (B, N, D) (image tokens only, FLUX included) or the last hidden layer (B, D). A hook only reads an
activation, so the velocity path is unchanged bit for bit, and it works under ZeRO-3, whose own hooks gather the
partitioned parameters around the same module call.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from sid_fast.flow import interpolate
from sid_fast.losses import loss_weight
from sid_fast.losses_adv import adversarial_generator_loss, discriminator_loss
from sid_fast.models.mixture import MixtureRealData  # noqa: F401  (re-exported: its home moved to the family)
from sid_fast.models.protocol import Conditioning
from sid_fast.trainer import SiDTrainer


def feature_module(model: nn.Module) -> nn.Module:
    """The submodule whose input is the §5 discriminator feature; a clear error for models without one."""
    getter = getattr(model, "feature_module", None)
    if getter is None:
        raise TypeError(f"{type(model).__name__} has no `feature_module()`: the data-aided variant (§5) needs the fake "
                        "score's final-norm tokens (DiT adapters and VelocityMLP provide them)")
    return getter()


@contextlib.contextmanager
def capture_features(model: nn.Module):
    """Yields a list that receives the input of `feature_module(model)` at each call inside the context."""
    captured: list[Tensor] = []

    def hook(module, args):
        captured.append(args[0])

    handle = feature_module(model).register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def pool_features(features: Tensor) -> Tensor:
    """(B, N, D) tokens -> mean over image tokens (B, D); (B, D) stays. fp32."""
    if features.ndim == 3:
        return features.float().mean(dim=1)
    if features.ndim == 2:
        return features.float()
    raise ValueError(f"discriminator features must be (B, N, D) or (B, D), got {tuple(features.shape)}")


def velocity_and_logits(model: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
    """One conditional pass: (velocity like x_t, logits (B, D)), each hidden channel one logit (§5)."""
    with capture_features(model) as captured:
        velocity = model(x_t, t, cond)
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the feature module per forward, got {len(captured)}")
    logits = pool_features(captured[0])
    if _zero3_partitioned(model) and torch.is_grad_enabled() and velocity.requires_grad:
        # ZeRO-3 pairs every module's pre-/post-backward hooks, which sit on module outputs; a loss on the logits
        # alone starts backward inside the network. A zero-weighted velocity term routes it through the output.
        logits = logits + 0.0 * velocity.float().sum()
    return velocity, logits


def _zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def discriminator_logits(model: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """(B, D) logits of the fake network at (x_t, t, cond)."""
    return velocity_and_logits(model, x_t, t, cond)[1]


# ---------------------------------------------------------------- real data


def load_generator_weights(path: str | Path) -> dict[str, Tensor]:
    """Weights of a finished data-free generator: `generator.safetensors` (run output / export) or a local-engine
    checkpoint step directory (its generator_ema.safetensors when present, else generator.safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        for name in ("generator_ema.safetensors", "generator.safetensors"):
            if (path / name).is_file():
                return load_file(path / name)
        raise FileNotFoundError(f"config field adversarial.init_generator: {path} holds no generator(_ema).safetensors "
                                "(a DeepSpeed checkpoint: use the run's consolidated generator.safetensors)")
    return load_file(path)


def init_generator_from(generator: nn.Module, path: str | Path) -> None:
    """Copy a data-free generator's weights into `generator` (before the engine is built); names must match.

    A bare transformer file, e.g. the shipped float16 ShapesWorld generators (`sid_fast.demo.shapes.save_generator`),
    names its weights without the adapter's `transformer.` prefix; it is accepted when all names match with it.
    Weights are cast to the generator's dtype; buffers the file lacks keep the generator's values."""
    state = load_generator_weights(path)
    own = generator.state_dict()
    if set(state) != set(own) and hasattr(generator, "transformer"):
        prefixed = {f"transformer.{name}": value for name, value in state.items()}
        if set(prefixed) == set(own):
            state = prefixed
    try:
        missing, unexpected = generator.load_state_dict(state, strict=False)
    except RuntimeError as error:  # size mismatches: another architecture
        raise ValueError(f"config field adversarial.init_generator: {path} does not fit the generator: {error}") from None
    buffers = {name for name, _ in generator.named_buffers()}
    missing = [name for name in missing if name not in buffers]  # an EMA file holds parameters only: buffers (the
    # fixed positional tables) keep the generator's own values, which are the teacher's it was copied from
    if missing or unexpected:
        raise ValueError(f"config field adversarial.init_generator: {path} does not fit the generator "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


# ---------------------------------------------------------------- the trainer


class DataAidedTrainer(SiDTrainer):
    """SiD²ₐ: SiD plus L_D in the fake-score step and L_adv in the generator step, with the §5 warm-up.

    real_data: has `sample_with_latents(batch) -> (x0_real (B, *sample_shape), Conditioning)`; image
    `ShardConditions` or `MixtureRealData`. Images counted are `images_seen` (both steps, all ranks).
    """

    def __init__(self, config, engine, conditions, sample_shape, real_data):
        super().__init__(config, engine, conditions, sample_shape)
        if not config.adversarial.enabled:
            raise ValueError("config field adversarial.enabled: DataAidedTrainer needs adversarial.enabled=true")
        if not hasattr(real_data, "sample_with_latents"):
            raise TypeError(f"{type(real_data).__name__} has no sample_with_latents(batch): data-aided runs need image shards")
        feature_module(engine.fake_score)  # fail now, not at the first step
        self.real_data = real_data
        self.elements = 1
        for size in self.sample_shape:
            self.elements *= size  # C·H·W of §5
        self.last_terms: dict[str, Tensor] = {}

    def adversarial_active(self) -> bool:
        return self.images_seen >= self.config.adversarial.adversarial_from_images

    def generator_active(self, step: int) -> bool:
        return super().generator_active(step) and self.images_seen >= self.config.adversarial.generator_warmup_images

    def fake_score_loss(self, steps_run: int) -> Tensor:
        """§3 fake-score loss + L_D on real x_t (same ε, t as the fake batch, own captions) vs generator x_t."""
        batch = self._fake_batch(steps_run)
        loss = self._fake_score_loss_on(**batch)
        x0_real, cond_real = self.real_data.sample_with_latents(batch["x_g"].shape[0])
        x0_real = x0_real.to(device=self.device, dtype=batch["x_g"].dtype)
        if x0_real.shape != batch["x_g"].shape:
            raise ValueError(f"real latents {tuple(x0_real.shape)} do not match the generator's {tuple(batch['x_g'].shape)}")
        real_x_t = interpolate(x0_real, batch["noise"], batch["t"])  # §5: same ε and t as the fake batch
        both = Conditioning.cat([cond_real.to(self.device), batch["cond"]])
        _, logits = velocity_and_logits(self.engine.fake_score, torch.cat([real_x_t, batch["x_t"]]),
                                        torch.cat([batch["t"], batch["t"]]), both)
        self.guard.watch(logits, "fake_score", "discriminator logits")
        real_logits, fake_logits = logits.chunk(2)
        self.last_logits = (real_logits.detach(), fake_logits.detach())
        loss_d = discriminator_loss(real_logits, fake_logits, self.elements).mean()
        self.last_terms["loss_d"] = loss_d.detach()  # read with the log line, not here
        return loss + loss_d

    def generator_loss(self, steps_run: int) -> Tensor:
        """§5: L_θ, then 0.5·L_θ + 0.5·L_adv once images_seen ≥ adversarial_from_images."""
        adv = self.config.adversarial
        batch = self._generator_batch(steps_run)
        loss = self._sid_generator_loss_on(**batch)
        if not self.adversarial_active():
            return loss
        with self.engine.frozen("fake_score"):
            logits = discriminator_logits(self.engine.fake_score, batch["x_t"], batch["t"], batch["cond"])
        self.guard.watch(logits, "fake_score", "discriminator logits of generator samples")
        weight = loss_weight(adv.weighting, batch["t"])
        loss_adv = adversarial_generator_loss(logits, weight, self.elements).mean()
        self.last_terms["loss_adv"] = loss_adv.detach()
        return adv.sid_weight * loss + adv.adv_weight * loss_adv

    def _train_step(self):
        self.last_terms = {}
        stats = super()._train_step()
        stats.loss_d = self.last_terms.get("loss_d")
        stats.loss_adv = self.last_terms.get("loss_adv")
        return stats

    def state(self) -> dict:
        state = super().state()
        if hasattr(self.real_data, "state_dict") and self.real_data is not self.conditions:
            state["real_data"] = self.real_data.state_dict()
        return state

    def resume(self, directory: Path | None = None) -> bool:
        """The SiD resume, then the real-data stream's own state (MixtureRealData, ShapesRealData), so a resumed
        run draws the same real batches as an uninterrupted one."""
        from sid_fast.checkpoint import latest_checkpoint

        directory = directory or latest_checkpoint(self.ckpt_root)
        if not super().resume(directory):
            return False
        state = json.loads((Path(directory) / "state.json").read_text())
        if "real_data" in state and hasattr(self.real_data, "load_state_dict"):
            self.real_data.load_state_dict(state["real_data"])
        return True


def initial_generator(config, bundle) -> nn.Module | None:
    """The generator a run starts from: a copy of the teacher (or the bundle's student) holding
    adversarial.init_generator's weights, or None (build_engine then copies the teacher) when it is not set."""
    if config.adversarial.init_generator is None:
        return None
    from sid_fast.api import init_student

    _, generator = init_student(bundle.teacher, bundle.student)
    init_generator_from(generator, config.adversarial.init_generator)
    return generator


def build_data_aided_trainer(config, bundle, real_data, engine=None) -> DataAidedTrainer:
    """§5 set-up: fake score copied fresh from the teacher (or the bundle's student), generator from
    `adversarial.init_generator` (a finished data-free run), the configured engine, and the trainer."""
    from sid_fast.engine.build import build_engine

    if engine is None:  # build_engine makes the fake score (a fresh copy, or LoRA with teacher.fake_lora_rank)
        engine = build_engine(config, bundle, generator=initial_generator(config, bundle))
    return DataAidedTrainer(config, engine, bundle.conditions, bundle.sample_shape, real_data)
