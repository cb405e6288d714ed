"""`sid-fast distill CONFIG.yaml [--section.field=value ...]`: SiD distillation (engine.kind: local or deepspeed)."""

from __future__ import annotations

from sid_fast.config import dump_yaml, load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (optional; defaults plus overrides otherwise)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    from sid_fast.composition import run_training

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    # engine.kind picks the single-process engine or DeepSpeed ZeRO-3 (run under `deepspeed`/torchrun)
    run_training(config)
    return 0
