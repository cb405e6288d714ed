"""From a config and a teacher bundle to an engine: `build_engine(config, bundle)` makes the fake score and
generator (copies of the teacher or the bundle's student; a LoRA fake score with teacher.fake_lora_rank), casts the
frozen teacher (teacher.frozen_dtype) and picks the engine from `config.engine.kind` (local | deepspeed).

Engines only: the whole training run (teacher, data, trainer, evaluation, export) is composed above the trainer, in
`sid_fast.composition`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sid_fast.config import SiDConfig


def build_engine(config: SiDConfig, bundle, fake_score: nn.Module | None = None, generator: nn.Module | None = None):
    """The engine named by `config.engine.kind` holding bundle.teacher and copies of the student."""
    if fake_score is None and config.teacher.fake_lora_rank:
        from sid_fast.models.lora import make_lora_fake_score

        # the fake score shares the frozen teacher's weights and trains LoRA adapters only
        fake_score = make_lora_fake_score(bundle.teacher.requires_grad_(False), config.teacher.fake_lora_rank,
                                          seed=config.train.seed)
    if fake_score is None or generator is None:  # copies of the student (or teacher) for whichever was not given
        source = bundle.teacher if bundle.student is None else bundle.student
        if not any(True for _ in source.parameters()):
            raise ValueError("the teacher has no parameters to copy; pass `student=` (a network of the teacher's shape)")
        fake_score = copy.deepcopy(source).requires_grad_(True) if fake_score is None else fake_score
        generator = copy.deepcopy(source).requires_grad_(True) if generator is None else generator
    frozen = config.teacher.frozen_dtype
    if frozen and frozen != config.teacher.dtype:  # after the students were copied from it
        if config.engine.kind == "deepspeed":
            raise ValueError("config field teacher.frozen_dtype: the DeepSpeed engine holds all three networks in "
                             "one dtype (engine.bf16=true keeps the teacher in bf16 without fp32 masters); leave "
                             "teacher.frozen_dtype empty with engine.kind=deepspeed")
        bundle.teacher.to(getattr(torch, frozen))
    if config.engine.kind == "local":
        from sid_fast.engine.local import LocalEngine

        checkpointed = ()
        if config.engine.activation_checkpointing:
            checkpointed = tuple(n.strip() for n in config.engine.checkpoint_networks.split(",") if n.strip())
        return LocalEngine(bundle.teacher, fake_score, generator, config.optim, grad_accum=config.train.grad_accum,
                           ema_decay=config.train.ema_decay, device=config.train.device, checkpointed=checkpointed)
    from sid_fast.engine.zero3 import DeepSpeedEngine

    return DeepSpeedEngine(bundle.teacher, fake_score, generator, config.optim, config.train, config.engine)
