"""`sid-fast demo`: the embedded default job, end to end, with a report."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--world", choices=("shapes", "mixture"), default="shapes",
                        help="shapes: distil the shipped ShapesWorld text-to-image teacher (default); "
                             "mixture: SiD on the exact 8-mode ring teacher of DESIGN.md §9")
    parser.add_argument("--out", default=None, help="output directory (default runs/demo, or runs/demo-mixture)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything")
    parser.add_argument("--full", action="store_true",
                        help="shapes: train the fresh run for 4x the demo preset's iterations")
    parser.add_argument("--prompts", type=int, default=200, help="shapes: held-out one-object prompts scored per sampler")
    parser.add_argument("--two-object-prompts", type=int, default=100,
                        help="shapes: held-out two-object prompts scored per sampler (0: skip)")
    parser.add_argument("--captions", type=int, default=0,
                        help="shapes: use only this many training captions for the prompt shards (0: all)")
    parser.add_argument("--samples", type=int, default=4000, help="mixture: samples per evaluated sampler")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from sid_fast.commands import load_user_config, output_dir
    from sid_fast.errors import UserError

    for name in ("prompts", "samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("two_object_prompts", "captions"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.world == "mixture":
        from sid_fast.demo import mixture

        load_user_config(str(mixture.PRESET), args.overrides)  # bad overrides stop here, before any work
        mixture.run(output_dir(args.out or "runs/demo-mixture", "--out"), args.overrides, num_samples=args.samples,
                    seed=args.seed)
        return 0
    from sid_fast.demo import shapes

    load_user_config(str(shapes.PRESET), args.overrides)
    output_dir(args.out or "runs/demo", "--out")
    shapes.run(args.out or "runs/demo", args.overrides, seed=args.seed, prompts=args.prompts,
               two_object_prompts=args.two_object_prompts, full=args.full, progress=not args.no_progress,
               captions=args.captions)
    return 0
