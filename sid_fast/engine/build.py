"""From a config to an engine and a trainer: the one entry point `sid-fast distill` and the launchers share.

`build_engine(config, bundle)` picks the engine from `config.engine.kind` (local | deepspeed);
`run_training(config)` builds the teacher bundle, the engine, the SiD trainer (SiD²ₐ with adversarial.enabled: real
latents from image shards, the exact mixture's samples, or ShapesWorld scenes rendered for the prompt shards'
captions) and (eval.every_images > 0) its in-loop evaluator, trains, and writes the consolidated generator (rank 0)
as `<out_dir>/generator.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sid_fast.config import SiDConfig, dump_yaml


def build_engine(config: SiDConfig, bundle, fake_score: nn.Module | None = None, generator: nn.Module | None = None):
    """The engine named by `config.engine.kind` holding bundle.teacher and copies of the student."""
    from sid_fast.api import init_student

    if fake_score is None or generator is None:
        fake_score, generator = init_student(bundle.teacher, bundle.student)
        if config.teacher.fake_lora_rank:
            from sid_fast.models.lora import make_lora_fake_score

            # the fake score shares the frozen teacher's weights and trains LoRA adapters only
            fake_score = make_lora_fake_score(bundle.teacher.requires_grad_(False), config.teacher.fake_lora_rank)
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


def run_training(config: SiDConfig, bundle=None) -> Path:
    """Train with `config` (every rank calls this); returns the path of the exported generator."""
    from safetensors.torch import save_file

    from sid_fast.models.registry import build_teacher
    from sid_fast.trainer import SiDTrainer

    torch.set_flush_denormal(True)
    bundle = bundle if bundle is not None else build_teacher(config.teacher)
    if config.data.shards is not None:
        from sid_fast.data import build_conditions
        from sid_fast.data.encoding import teacher_id

        expected = None
        if config.teacher.path is not None:  # shards must come from this teacher's own encoders
            expected = teacher_id(config.teacher.kind, config.teacher.path, config.teacher.max_sequence_length)
        bundle.conditions = build_conditions(config.data, expected, config.train.seed)
    if bundle.conditions is None:
        raise ValueError("config field data.shards: this teacher has no prompts; prepare prompt shards with "
                         "`sid-fast prepare prompts` and pass --data.shards=DIR (or give teacher.prompts)")
    if config.adversarial.enabled:  # SiD²ₐ (§5): real latents with their captions, fake score as discriminator
        from sid_fast.adversarial import MixtureRealData, build_data_aided_trainer

        if config.teacher.kind == "shapes":  # pixel space, prompt shards: scenes rendered for their captions
            from sid_fast.shapes.real import ShapesRealData

            real_data = ShapesRealData.from_conditions(bundle.conditions, resolution=bundle.sample_shape[-1],
                                                       seed=config.train.seed + 1)
        elif config.data.shards is not None:
            real_data = bundle.conditions  # image shards: latents + captions (prepare images)
        elif bundle.reference is not None:
            real_data = MixtureRealData(bundle.reference, bundle.conditions, seed=config.train.seed + 1)
        else:
            raise ValueError("config field data.shards: data-aided SiD (adversarial.enabled) needs image shards "
                             "with latents (`sid-fast prepare images`)")
        trainer = build_data_aided_trainer(config, bundle, real_data)
        engine = trainer.engine
    else:
        engine = build_engine(config, bundle)
        trainer = SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)
    if config.eval.every_images > 0:  # in-loop evaluation: fixed prompts, eval.metric, best checkpoints
        from sid_fast.eval.build import build_evaluator

        trainer.evaluator = build_evaluator(config, bundle.conditions, bundle.sample_shape, reference=bundle.reference,
                                            device=engine.device)
    out = Path(config.train.out_dir)
    if engine.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(config))
    trainer.fit()
    state = engine.generator_state_dict(ema=True)  # collective under ZeRO-3: every rank takes part
    if engine.rank == 0:
        save_file(state, out / "generator.safetensors")
        print(f"generator written to {out / 'generator.safetensors'}")
        if config.teacher.kind in ("sd3", "flux", "sana"):
            from sid_fast.export import export_from_state_dict

            method = config.method
            directory = export_from_state_dict(config.teacher, out / "generator.safetensors", out / "generator-diffusers",
                                               method.num_steps, method.t_init, method.noise)
            print(f"diffusers transformer + SiD scheduler written to {directory}")
    engine.barrier()
    return out / "generator.safetensors"
