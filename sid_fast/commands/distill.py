"""`sid-fast distill CONFIG.yaml [--section.field=value ...]`: SiD distillation (engine.kind: local or deepspeed)."""

from __future__ import annotations

from sid_fast.commands import load_user_config, output_dir
from sid_fast.config import dump_yaml


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (optional; defaults plus overrides otherwise)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    config = load_user_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    output_dir(config.train.out_dir, "train.out_dir")
    from sid_fast.composition import run_training

    # engine.kind picks the single-process engine or DeepSpeed ZeRO-3 (run under `deepspeed`/torchrun)
    run_training(config)
    return 0
