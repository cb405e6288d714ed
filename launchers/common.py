"""What every launcher shares: pick the preset, apply `--section.field=value` overrides, then either print the
resolved config and planned per-rank memory (`--dry-run`, no weights loaded) or run the shared trainer.

Each launcher is run by the DeepSpeed launcher (which appends --local_rank; the rank comes from the
environment) or by torchrun:
    deepspeed --num_gpus 8 launchers/sd35_medium.py --teacher.path /models/sd3.5-medium
    torchrun --nproc_per_node 8 launchers/sd35_medium.py --teacher.path /models/sd3.5-medium
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
sys.path.insert(0, str(CONFIGS.parents[1]))  # run from a checkout without installing


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(description="SiD distillation under DeepSpeed ZeRO-3")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and planned memory per rank; load nothing")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="for --dry-run outside a launcher (default: LOCAL_WORLD_SIZE or 8)")
    parser.add_argument("--nodes", type=int, default=None, help="for --dry-run outside a launcher (default: WORLD_SIZE / gpus per node)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="for --dry-run: memory of one GPU")
    args, rest = parser.parse_known_args([a for a in argv if not a.startswith("--local_rank")])
    bad = [item for item in rest if "=" not in item and not item.startswith("--")]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --section.field=value")
    return args, rest


def dry_run(config, plan_spec, args) -> None:
    from dataclasses import replace

    from sid_fast.config import dump_yaml
    from sid_fast.engine.ds_config import network_config
    from sid_fast.engine.planner import GIB, HEADER, PlanOptions, describe_min_gpus, format_row, min_gpus, plan

    print("# resolved sid_fast config\n" + dump_yaml(config))
    print("# DeepSpeed config of the generator (fake score: same with its lr; teacher: no optimizer)")
    print(json.dumps(network_config(config.engine, config.optim, config.train, config.optim.lr_generator,
                                    use_ds_optimizer=config.engine.optimizer != "torch"), indent=1))
    gpus_per_node = args.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", 8))
    nodes = args.nodes or max(1, int(os.environ.get("WORLD_SIZE", gpus_per_node)) // gpus_per_node)
    spec = plan_spec()
    options = PlanOptions(resolution=config.teacher.resolution or 1024, micro_batch=config.train.batch_size,
                          gpus_per_node=gpus_per_node, nodes=nodes, gpu_gib=args.gpu_gib,
                          offload_optimizer=config.engine.offload_optimizer,
                          activation_checkpointing=config.engine.activation_checkpointing,
                          lora_fake_rank=config.teacher.fake_lora_rank,
                          precision="bf16" if config.engine.bf16 else "fp32",
                          cfg=any(k not in (0.0, 1.0) for k in (config.method.kappa_teacher, config.method.kappa_fake_gen)))
    result = plan(spec, options)
    fake = (f"teacher + LoRA rank {options.lora_fake_rank} sharing the teacher's partitioned base"
            if options.lora_fake_rank else "a full copy")
    print(f"# planned memory per rank ({spec.params / 1e9:.3g}B parameters per network, {result['tokens']} tokens; "
          f"fake score: {fake})")
    print(HEADER)
    print(format_row(result))
    print(f"# global batch per update: {config.train.batch_size} × {config.train.grad_accum} × "
          f"{gpus_per_node * nodes} GPUs = {config.train.batch_size * config.train.grad_accum * gpus_per_node * nodes}; "
          f"total {result['total'] / GIB:.1f} GiB per GPU")
    fewest = describe_min_gpus(min_gpus(spec, options), gpus_per_node)
    line = f"# fewest {args.gpu_gib:.0f} GB GPUs for this config: {fewest}"
    if not options.lora_fake_rank:
        lora = describe_min_gpus(min_gpus(spec, replace(options, lora_fake_rank=64)), gpus_per_node)
        line += f"; with a LoRA fake score (--teacher.fake_lora_rank=64): {lora}"
    print(line)


def main(preset: str, plan_spec, argv: list[str] | None = None, base_yaml: Path | None = None) -> int:
    """Run launcher `preset` (a YAML in configs/ over `base_yaml`, with its DeepSpeed JSON beside it). What the user
    can fix (a config field, an override, a teacher directory) is one line and status 2, as for `sid-fast`."""
    from sid_fast.cli import run_command

    return run_command(preset, lambda _: _run(preset, plan_spec, argv, base_yaml), None, prog=f"launchers/{preset}.py")


def _run(preset: str, plan_spec, argv: list[str] | None, base_yaml: Path | None) -> int:
    from sid_fast.config import load_config
    from sid_fast.errors import ConfigError

    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    defaults = [f"engine.ds_config={CONFIGS / (preset + '.json')}"] if (CONFIGS / (preset + ".json")).is_file() else []
    base = load_config(base_yaml) if base_yaml is not None else None
    config = load_config(CONFIGS / f"{preset}.yaml", defaults + overrides, base=base)
    if config.engine.kind != "deepspeed":
        raise ConfigError(f"config field engine.kind: launchers run the DeepSpeed engine, got {config.engine.kind!r} "
                          f"(use `sid-fast distill` for the local engine)")
    if args.dry_run:
        dry_run(config, plan_spec, args)
        return 0
    from sid_fast.composition import run_training

    run_training(config)
    return 0
