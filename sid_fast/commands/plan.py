"""`sid-fast plan`: predicted per-GPU memory of a SiD run under ZeRO-3 and whether it fits (see engine/planner.py).

    sid-fast plan --teacher flux-dev --resolution 1024 --activation-checkpointing [--fake-lora-rank 64] [--ema]
    sid-fast plan --all            # the table of docs/distributed.md
    sid-fast plan --all --min-gpus --fake-lora-rank 64      # fewest 80 GB GPUs, full copies vs LoRA fake score
"""

from __future__ import annotations

import json

from sid_fast.errors import UserError


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
    parser.add_argument("--fake-lora-rank", "--lora-fake-rank", dest="lora_fake_rank", type=int, default=0,
                        help="fake score = the teacher's partitioned base + LoRA adapters of this rank "
                             "(teacher.fake_lora_rank); 0: a full fake-score copy")
    parser.add_argument("--ema", action="store_true",
                        help="count an fp32 EMA of the generator (train.ema_decay > 0), partitioned like its weights")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-cfg", action="store_true", help="κ in {0, 1}: no doubled CFG batches")
    parser.add_argument("--all", action="store_true", help="all teachers at 512 and 1024 px, three option sets "
                                                          "(with --min-gpus: all teachers at --resolution)")
    parser.add_argument("--min-gpus", action="store_true",
                        help="the fewest GPUs of --gpu-gib (and nodes of --gpus-per-node) on which the config fits, "
                             "with and without activation checkpointing; with --fake-lora-rank R both the full fake "
                             "score and the LoRA one")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check-deepspeed", action="store_true",
                        help="also print DeepSpeed's own ZeRO-3 estimate of each trainable network's model states")


def _validate(args) -> None:
    for name in ("resolution", "micro_batch", "gpus_per_node", "nodes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lora_fake_rank < 0:
        raise UserError(f"--fake-lora-rank must be >= 0, got {args.lora_fake_rank}")
    if not args.gpu_gib > 0:
        raise UserError(f"--gpu-gib must be > 0, got {args.gpu_gib}")


MIN_GPUS_HEADER = ("| teacher | px | fake score | GiB/GPU on {gpus}×{gib:.0f} GB | fewest {gib:.0f} GB GPUs | "
                   "GiB/GPU on {gpus}, act. ckpt | fewest GPUs, act. ckpt |\n|---|---|---|---|---|---|---|")


def _min_gpus_rows(args, keys: list[str], base: dict) -> tuple[list[dict], list[str]]:
    """One row per teacher and fake-score kind: per-GPU GiB on the given GPUs and the fewest GPUs, without and with
    activation checkpointing."""
    from sid_fast.engine.planner import GIB, MODELS, PlanOptions, describe_min_gpus, min_gpus, plan

    ranks = [0] + ([args.lora_fake_rank] if args.lora_fake_rank > 0 else [])
    records, lines = [], []
    for key in keys:
        for rank in ranks:
            cells, record = [], {"teacher": key, "resolution": args.resolution, "lora_fake_rank": rank}
            for ckpt in (False, True):
                options = PlanOptions(resolution=args.resolution, offload_optimizer=args.offload_optimizer,
                                      activation_checkpointing=ckpt, **{**base, "lora_fake_rank": rank})
                here, fewest = plan(MODELS[key], options), min_gpus(MODELS[key], options)
                tag = "act_ckpt" if ckpt else "no_ckpt"
                record[tag] = {"gib_per_gpu": here["total"] / GIB, "fits": here["fits"],
                               "min_gpus": fewest[0] if fewest else None,
                               "gib_per_gpu_at_min": fewest[1]["total"] / GIB if fewest else None}
                verdict = "" if here["fits"] else " (OOM)"
                cells += [f"{here['total'] / GIB:.1f}{verdict}", describe_min_gpus(fewest, args.gpus_per_node)]
            kind = f"LoRA r={rank}, shared base" if rank else "full copy"
            lines.append(f"| {MODELS[key].name} | {args.resolution} | {kind} | " + " | ".join(cells) + " |")
            records.append(record)
    return records, lines


def run(args) -> int:
    from sid_fast.engine.planner import GIB, HEADER, MODELS, PlanOptions, deepspeed_estimate, format_row, plan

    _validate(args)
    base = dict(micro_batch=args.micro_batch, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                gpu_gib=args.gpu_gib, precision=args.precision, cfg=not args.no_cfg, lora_fake_rank=args.lora_fake_rank,
                ema=args.ema)
    if args.min_gpus:
        records, lines = _min_gpus_rows(args, sorted(MODELS, key=lambda k: MODELS[k].params) if args.all
                                        else [args.teacher], base)
        if args.json:
            print(json.dumps(records, indent=1))
            return 0
        print(MIN_GPUS_HEADER.format(gpus=args.gpus_per_node * args.nodes, gib=args.gpu_gib))
        print("\n".join(lines))
        return 0
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
