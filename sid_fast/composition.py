"""The composition root: from a config to a finished training run, the one entry point `sid-fast distill`, the
launchers and the studies share.

`run_training(config)` builds the teacher bundle (its family), the condition source (the family's prompts or
prepared shards), the engine (`sid_fast.engine.build.build_engine`), the SiD trainer (the SiD²ₐ trainer with
adversarial.enabled, fed the family's own real data or image shards) and, with eval.every_images > 0, its in-loop
evaluator; trains; and writes the consolidated generator (rank 0) as `<out_dir>/generator.safetensors` (+ a
diffusers directory for the real families). It sits above the trainer and the engines: nothing below imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sid_fast.config import SiDConfig, dump_yaml
from sid_fast.engine.build import build_engine


def real_data_source(config: SiDConfig, bundle):
    """SiD²ₐ's real data (§5): the teacher family's own (ShapesWorld scenes, the exact mixture's samples), else the
    image shards of data.shards (latents + captions from `sid-fast prepare images`)."""
    if bundle.real_data is not None:
        return bundle.real_data(bundle.conditions, config.train.seed + 1)
    if config.data.shards is not None:
        return bundle.conditions
    raise ValueError("config field data.shards: data-aided SiD (adversarial.enabled) needs image shards "
                     "with latents (`sid-fast prepare images`)")


def build_trainer(config: SiDConfig, bundle):
    """The SiD trainer for `bundle` (SiD²ₐ's `DataAidedTrainer` with adversarial.enabled) on its engine."""
    if config.adversarial.enabled:  # SiD²ₐ (§5): real latents with their captions, fake score as discriminator
        from sid_fast.adversarial import build_data_aided_trainer

        return build_data_aided_trainer(config, bundle, real_data_source(config, bundle))
    from sid_fast.adversarial import initial_generator
    from sid_fast.trainer import SiDTrainer

    # with adversarial.init_generator: continued data-free SiD from a finished generator
    engine = build_engine(config, bundle, generator=initial_generator(config, bundle))
    return SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)


def run_training(config: SiDConfig, bundle=None, evaluator=None) -> Path:
    """Train with `config` (every rank calls this); returns the path of the exported generator. `evaluator` (an
    object with `evaluate(trainer) -> dict`, e.g. `sid_fast.demo.curve.Curve`) replaces the in-loop evaluator that
    config.eval would build; it runs every eval.every_images images, which must then be > 0, and, when it has a
    `start(trainer)` method, once before training (where a resumed run starts, that is before the resume)."""
    from safetensors.torch import save_file

    from sid_fast.models.registry import build_teacher

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
    trainer = build_trainer(config, bundle)
    engine = trainer.engine
    if evaluator is not None:
        if config.eval.every_images <= 0:
            raise ValueError("config field eval.every_images: must be > 0 when an evaluator is given (how often it runs)")
        trainer.evaluator = evaluator
        if hasattr(evaluator, "start"):
            evaluator.start(trainer)
    elif config.eval.every_images > 0:  # in-loop evaluation: fixed prompts, eval.metric, best checkpoints
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
