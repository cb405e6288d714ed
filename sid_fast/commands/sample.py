"""`sid-fast sample GENERATOR_DIR --teacher TEACHER_DIR --prompt "..." [--prompt ...] --out grid.png`

Samples an exported generator (`sid_fast.export.export_generator`) with the K-step SiD sampler (§2): prompts
are encoded by the teacher's own text encoders, latents decoded by its VAE, images written as one PNG grid.
`--preset NAME` uses the built-in random tiny components instead of a teacher directory (tests, demo).
"""

from __future__ import annotations

import math
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("generator", help="directory written by export_generator (transformer/ + sid_sampler.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="teacher diffusers directory (text encoders, tokenizers, VAE)")
    source.add_argument("--preset", help="built-in tiny components of the generator's family instead of --teacher")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts-file", help="text file, one prompt per line")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--steps", type=int, default=0, help="K sampler steps (0: the exported default)")
    parser.add_argument("--noise", choices=["fresh", "fixed", "ddim"], help="sampler noise (default: exported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial and fresh noise")
    parser.add_argument("--resolution", type=int, default=0, help="image size in pixels (0: the teacher's default)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generator batch")
    parser.add_argument("--max-sequence-length", type=int, default=0, help="T5/Gemma tokens (0: pipeline default)")
    parser.add_argument("--device", default="cpu", help="torch device")


def decode_latents(family: str, vae, latents):
    """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1], undoing the family's latent scaling (§1 table)."""
    config = vae.config
    latents = latents / config.scaling_factor
    if family != "sana":  # SD3/FLUX: z = (E(x) - shift) * scale
        latents = latents + (getattr(config, "shift_factor", None) or 0.0)
    images = vae.decode(latents.to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def save_grid(images, path: Path) -> None:
    """(N, 3, H, W) in [0, 1] -> one PNG with ceil(sqrt(N)) columns."""
    import numpy as np
    from PIL import Image

    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def run(args) -> int:
    import json

    from sid_fast.commands import input_path, output_dir
    from sid_fast.errors import UserError

    input_path(args.generator, "generator directory", "dir")
    if args.teacher:
        input_path(args.teacher, "--teacher", "dir")
    output_dir(Path(args.out).parent, "--out")
    if args.steps < 0 or args.batch_size < 1 or args.resolution < 0:
        raise UserError(f"--steps must be >= 0, --batch-size >= 1 and --resolution >= 0; got {args.steps}, "
                        f"{args.batch_size} and {args.resolution}")

    import diffusers
    import torch
    from tqdm.auto import tqdm

    from sid_fast.encoders import PromptEncoder, read_prompts
    from sid_fast.export import load_generator, read_sampler_meta
    from sid_fast.models import tiny_components
    from sid_fast.models.diffusers_family import latent_shape, vae_scale_factor
    from sid_fast.sampler import few_step_sample

    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts-file")
    meta = read_sampler_meta(args.generator)
    family = meta["family"]
    if args.teacher:  # a teacher of another family: its encoders would not fit the generator
        from sid_fast.models.diffusers_family import check_teacher_dir

        check_teacher_dir(args.teacher, family)
    generator = load_generator(args.generator).to(args.device)
    transformer_config = dict(generator.transformer.config)
    if args.teacher:
        encoder = PromptEncoder.from_pretrained(args.teacher, family, device=args.device,
                                                max_sequence_length=args.max_sequence_length)
        vae_config = json.loads((Path(args.teacher) / "vae" / "config.json").read_text())
        vae = getattr(diffusers, vae_config["_class_name"]).from_pretrained(args.teacher, subfolder="vae",
                                                                            local_files_only=True)
        default_side = None
    else:
        spec = tiny_components.preset_spec(family, args.preset)
        instruction = tiny_components.TINY_INSTRUCTION if family == "sana" else None
        encoder = PromptEncoder(tiny_components.pipeline(family, args.preset, with_image_parts=False), family,
                                args.max_sequence_length or spec["seq"], instruction)
        vae = tiny_components.seeded(lambda: tiny_components.vae(family, args.preset), 2)  # the pipeline's VAE
        vae_config, default_side = dict(vae.config), spec["latent"]
    vae = vae.to(args.device).eval()
    shape = latent_shape(family, transformer_config, vae_config, args.resolution, default_side)
    steps, noise = args.steps or meta["num_steps"], args.noise or meta["noise"]
    rng = torch.Generator(device=args.device).manual_seed(args.seed)
    images = []
    with torch.no_grad():
        for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", unit="batch"):
            batch = prompts[start:start + args.batch_size]
            cond = encoder.encode(batch).to(args.device)
            z = torch.randn((len(batch), *shape), generator=rng, device=args.device)
            latents = few_step_sample(generator, z, cond, steps, noise=noise, rng=rng)
            images.append(decode_latents(family, vae, latents))
    encoder.release()
    out = Path(args.out)
    save_grid(torch.cat(images), out)
    side = shape[1] * vae_scale_factor(vae_config)
    print(f"{len(prompts)} images of {side}x{side} px ({steps} steps) written to {out}")
    return 0
