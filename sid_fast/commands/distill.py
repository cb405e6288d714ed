"""`sid-fast distill CONFIG.yaml [--section.field=value ...]`: SiD distillation with the single-process engine."""

from __future__ import annotations

from pathlib import Path

from sid_fast.config import dump_yaml, load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (optional; defaults plus overrides otherwise)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    import torch
    from safetensors.torch import save_file

    from sid_fast.api import init_student
    from sid_fast.engine import LocalEngine
    from sid_fast.models.registry import build_teacher
    from sid_fast.trainer import SiDTrainer

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    torch.set_flush_denormal(True)
    bundle = build_teacher(config.teacher)
    fake_score, generator = init_student(bundle.teacher, bundle.student)
    engine = LocalEngine(bundle.teacher, fake_score, generator, config.optim, grad_accum=config.train.grad_accum,
                         ema_decay=config.train.ema_decay, device=config.train.device)
    out = Path(config.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(config))
    trainer = SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)
    trainer.fit()
    save_file(engine.generator_state_dict(ema=True), out / "generator.safetensors")
    print(f"generator written to {out / 'generator.safetensors'}")
    return 0
