"""`sid-fast prepare prompts|images INPUT --out DIR --encoder FAMILY [...]`: encode once into webdataset shards.

  sid-fast prepare prompts prompts.txt --out shards/sd3 --encoder sd3 --teacher-path /models/sd3-medium
  sid-fast prepare images photos/ --out shards/sd3-img --encoder sd3 --teacher-path ... --resolution 512
  sid-fast prepare verify shards/sd3       (sizes and sha256 of every file against the manifest)

Interrupted runs resume when rerun with the same arguments (finished shards kept, the partial one redone).
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="{prompts,images,verify}", required=True)
    prompts = sub.add_parser("prompts", help="prompts (.txt one a line, .jsonl, .parquet) -> text-embedding shards")
    images = sub.add_parser("images", help="image+caption pairs (folder, .parquet, webdataset tars) -> latent + embedding shards")
    for command in (prompts, images):
        command.add_argument("input", help="input file or folder")
        command.add_argument("--out", required=True, help="output shard directory (created; rerun to resume)")
        command.add_argument("--encoder", default="tiny", help="teacher family whose encoders to use (sd3, flux, sana, tiny)")
        command.add_argument("--teacher-path", default=None, help="local diffusers snapshot of the teacher")
        command.add_argument("--text-field", default=None, help="jsonl/parquet text field (default: prompt, caption or text)")
        command.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
        command.add_argument("--dtype", default="bfloat16", help="stored dtype of embeddings: bfloat16, float16, float32")
        command.add_argument("--device", default="cpu", help="device the encoders run on")
        command.add_argument("--seed", type=int, default=0, help="seed of the tiny encoders (--encoder tiny only)")
        command.add_argument("--max-sequence-length", type=int, default=0, help="T5/Gemma tokens (0: the pipeline default)")
        command.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify = sub.add_parser("verify", help="check a shard directory's files against its manifest (sizes, sha256)")
    verify.add_argument("input", help="shard directory")
    prompts.add_argument("--batch-size", type=int, default=64, help="prompts encoded per batch")
    images.add_argument("--batch-size", type=int, default=16, help="images encoded per batch")
    images.add_argument("--resolution", type=int, required=True, help="square training resolution in pixels")
    images.add_argument("--latent-dtype", default="float32", help="stored dtype of latents")
    images.add_argument("--image-field", default=None, help="parquet image column (default: image, jpg, png, ...)")


def run(args) -> int:
    from sid_fast.commands import input_path, output_dir
    from sid_fast.errors import UserError

    if args.overrides:
        raise UserError(f"prepare takes no config overrides, got {args.overrides}")
    if args.what == "verify":
        input_path(args.input, "shard directory", "dir")
    else:
        input_path(args.input, "prompt file" if args.what == "prompts" else "image input")
        output_dir(args.out, "--out")
        for name in ("samples_per_shard", "batch_size"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from sid_fast.data.encoding import build_encoders
    from sid_fast.data.format import ShardManifest, verify_shards
    from sid_fast.data.prepare import prepare_images, prepare_prompts

    if args.what == "verify":
        problems = verify_shards(args.input)
        for line in problems:
            print(line)
        manifest = ShardManifest.load(args.input)
        print(f"{args.input}: {len(manifest.shards)} shards, {manifest.count} samples for teacher {manifest.teacher_id!r}: "
              f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0

    common = dict(samples_per_shard=args.samples_per_shard, dtype=args.dtype, text_field=args.text_field,
                  batch_size=args.batch_size, progress=not args.no_progress)
    resolution = args.resolution if args.what == "images" else None
    prompt_encoder, latent_encoder = build_encoders(args.encoder, args.teacher_path, args.device, resolution, args.seed,
                                                    args.max_sequence_length)
    if args.what == "prompts":
        manifest = prepare_prompts(args.input, args.out, prompt_encoder, **common)
    else:
        manifest = prepare_images(args.input, args.out, prompt_encoder, latent_encoder, latent_dtype=args.latent_dtype,
                                  image_field=args.image_field, **common)
    fields = ", ".join(f"{n} {tuple(f['shape'])} {f['dtype']}" for n, f in manifest.fields.items())
    print(f"{manifest.count} samples in {len(manifest.shards)} shards at {args.out} for teacher {manifest.teacher_id!r} "
          f"({fields}); {manifest.skipped} input records skipped as bad")
    return 0
