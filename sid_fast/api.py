"""The public Python API: distil any model that follows the protocol.

    from sid_fast import distill, SiDConfig
    result = distill(teacher, conditions, sample_shape=(16, 64, 64), config=config)
    images = result.sample(cond, num_steps=4)

`teacher` is a velocity model (see `sid_fast.models.protocol`); `conditions` a ConditionSource. The
generator and fake score start as copies of `student` (default: of the teacher).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sid_fast.config import SiDConfig
from sid_fast.engine import LocalEngine
from sid_fast.models.protocol import Conditioning
from sid_fast.sampler import few_step_sample
from sid_fast.trainer import SiDTrainer


@dataclass
class Distilled:
    """What `distill` returns: the generator to sample from (EMA weights when EMA is on) and its history."""

    generator: nn.Module
    config: SiDConfig
    sample_shape: tuple[int, ...]
    history: list[dict] = field(default_factory=list)
    trainer: SiDTrainer | None = None

    @torch.no_grad()
    def sample(self, cond: Conditioning, num_steps: int | None = None, z: Tensor | None = None,
               noise: str | None = None, seed: int = 0) -> Tensor:
        """K-step samples (§2) for the batch `cond`; defaults: the trained K and noise mode."""
        method = self.config.method
        device = next(self.generator.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)
        if z is None:
            z = torch.randn((len(cond), *self.sample_shape), generator=rng, device=device)
        return few_step_sample(self.generator, z, cond.to(device), num_steps or method.num_steps,
                               t_init=method.t_init, noise=noise or method.noise, rng=rng)


def init_student(teacher: nn.Module, student: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    """(fake_score, generator), both copies of `student` (or of the teacher), trainable."""
    source = teacher if student is None else student
    if not any(True for _ in source.parameters()):
        raise ValueError("the teacher has no parameters to copy; pass `student=` (a network of the teacher's shape)")
    fake_score = copy.deepcopy(source).requires_grad_(True)
    generator = copy.deepcopy(source).requires_grad_(True)
    return fake_score, generator


def distill(teacher: nn.Module, conditions, sample_shape: tuple[int, ...], config: SiDConfig | None = None, *,
            student: nn.Module | None = None, engine=None, evaluator=None, reference=None) -> Distilled:
    """Run SiD distillation with `config` (default SiDConfig()) and return the trained generator.

    With `eval.every_images > 0` an in-loop evaluator is built from the config (`sid_fast.eval.build`) unless
    `evaluator` is given; `reference`: ground truth with `sample(n, labels, generator)` for `fd` without
    `eval.reference` (default: the exact mixture of a `MixtureTeacher`)."""
    config = config or SiDConfig()
    if engine is None:
        fake_score, generator = init_student(teacher, student)
        engine = LocalEngine(teacher, fake_score, generator, config.optim, grad_accum=config.train.grad_accum,
                             ema_decay=config.train.ema_decay, device=config.train.device)
    trainer = SiDTrainer(config, engine, conditions, sample_shape)
    if evaluator is None and config.eval.every_images > 0:
        from sid_fast.eval.build import build_evaluator

        evaluator = build_evaluator(config, conditions, sample_shape, device=engine.device,
                                    reference=reference if reference is not None else getattr(teacher, "mixture", None))
    trainer.evaluator = evaluator
    history = trainer.fit()
    return Distilled(engine.sampling_generator(ema=True), config, tuple(sample_shape), history, trainer)
