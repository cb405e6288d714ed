"""`sid-fast plan`: predicted per-GPU memory of a SiD run under ZeRO-3 and whether it fits (see engine/planner.py).

    sid-fast plan --teacher flux-dev --resolution 1024 --activation-checkpointing
    sid-fast plan --all            # the table of docs/distributed.md
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    from sid_fast.engine.planner import MODELS

    parser.add_argument("--teacher", choices=sorted(MODELS), default="sd35-medium", help="teacher architecture")
    parser.add_argument("--resolution", type=int, default=1024, help="image size in pixels")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per GPU per micro-step")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB")
    parser.add_argument("--offload-optimizer", action="store_true", help="fp32 master weights and Adam states on CPU")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--lora-fake-rank", type=int, default=0, help="fake score as teacher + LoRA of this rank")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-cfg", action="store_true", help="κ in {0, 1}: no doubled CFG batches")
    parser.add_argument("--all", action="store_true", help="all teachers at 512 and 1024 px, three option sets")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check-deepspeed", action="store_true",
                        help="also print DeepSpeed's own ZeRO-3 estimate of each trainable network's model states")


def _validate(args) -> None:
    for name in ("resolution", "micro_batch", "gpus_per_node", "nodes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lora_fake_rank < 0:
        raise ValueError(f"--lora-fake-rank must be >= 0, got {args.lora_fake_rank}")


def run(args) -> int:
    from sid_fast.engine.planner import GIB, HEADER, MODELS, PlanOptions, deepspeed_estimate, format_row, plan

    _validate(args)
    base = dict(micro_batch=args.micro_batch, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                gpu_gib=args.gpu_gib, precision=args.precision, cfg=not args.no_cfg, lora_fake_rank=args.lora_fake_rank)
    runs = []
    if args.all:
        option_sets = [dict(), dict(activation_checkpointing=True),
                       dict(activation_checkpointing=True, offload_optimizer=True)]
        for key in MODELS:
            for resolution in (512, 1024):
                for extra in option_sets:
                    runs.append((key, PlanOptions(resolution=resolution, **base, **extra)))
    else:
        runs.append((args.teacher, PlanOptions(resolution=args.resolution, offload_optimizer=args.offload_optimizer,
                                               activation_checkpointing=args.activation_checkpointing, **base)))
    results = []
    for key, options in runs:
        result = plan(MODELS[key], options)
        if args.check_deepspeed:
            spec = MODELS[key]
            result["deepspeed_generator_states"] = deepspeed_estimate(spec.params, spec.largest_layer, options.gpus_per_node,
                                                                      options.nodes, options.offload_optimizer)
        results.append(result)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(HEADER)
    for result in results:
        print(format_row(result))
        if "deepspeed_generator_states" in result:
            print(f"|   DeepSpeed estimator, one trainable network: {result['deepspeed_generator_states'] / GIB:.2f} GiB "
                  f"(planner {result['generator_states'] / GIB:.2f} GiB) |")
    return 0
