"""Scoring any ShapesWorld sampler: draw held-out prompts, sample images, check them (Wilson 95% intervals).

    prompts = heldout_prompts(1, 200, seed=0)                        # (caption, spec) pairs
    images = teacher_samples(teacher, cond, uncond, steps=28, guidance=4.0, seed=0)   # (N, 3, 32, 32)
    print(score(images, [spec for _, spec in prompts]))               # 0.81 [0.75, 0.86] (n=200)
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from sid_fast.models.protocol import Conditioning
from sid_fast.sampler import euler_sample
from sid_fast.shapes.captions import caption_set
from sid_fast.shapes.world import PromptSpec


def heldout_prompts(objects: int, count: int, seed: int = 0, split: str = "heldout") -> list[tuple[str, PromptSpec]]:
    """`count` (caption, spec) pairs drawn without replacement (with, when the set is smaller) from a caption set."""
    pairs = caption_set(objects, split)
    rng = random.Random(seed)
    if count <= len(pairs):
        return rng.sample(pairs, count)
    return [rng.choice(pairs) for _ in range(count)]


@torch.no_grad()
def teacher_samples(teacher, cond: Conditioning, uncond: Conditioning, steps: int = 28, guidance: float = 4.0,
                    seed: int = 0, batch_size: int = 100, shape: tuple[int, int, int] = (3, 32, 32),
                    progress: bool = False) -> Tensor:
    """Euler samples of the probability-flow ODE with CFG (§4): (N, *shape) clamped to [-1, 1], N = len(cond).

    uncond: batch 1 (expanded). Noise comes from a CPU generator seeded with `seed`, so samples are reproducible;
    they are computed on the teacher's device and returned on the CPU."""
    device = next(teacher.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(cond), *shape, generator=generator)
    images = []
    starts = range(0, len(cond), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"teacher {steps}-step samples", leave=False)
    for start in starts:
        part = cond[start:start + batch_size]
        images.append(euler_sample(teacher, noise[start:start + batch_size].to(device), part.to(device), steps,
                                   uncond=uncond.expand_to(len(part)).to(device), guidance_scale=guidance).cpu())
    return torch.cat(images).clamp(-1, 1)


def evaluate_teacher(teacher, encoder, count: int = 200, steps: tuple[int, ...] = (28,), guidance: float = 4.0,
                     seed: int = 0, progress: bool = False) -> dict[tuple[str, str], object]:
    """Checker scores of `teacher`'s Euler samplers on held-out one- and two-object prompts.

    Returns {(f"teacher {k}-step cfg {guidance}", "1obj" | "2obj"): Score} (a proportion with its Wilson interval)."""
    from sid_fast.shapes.checker import score

    uncond = encoder.unconditional().to(dtype=torch.float32)
    results = {}
    for objects in (1, 2):
        prompts = heldout_prompts(objects, count, seed)
        cond = encoder.encode([caption for caption, _ in prompts]).to(dtype=torch.float32)
        for k in steps:
            images = teacher_samples(teacher, cond, uncond, k, guidance, seed, progress=progress)
            results[(f"teacher {k}-step cfg {guidance}", f"{objects}obj")] = score(images, [s for _, s in prompts])
    return results


@torch.no_grad()
def generator_samples(generator, cond: Conditioning, num_steps: int = 4, seed: int = 0, batch_size: int = 100,
                      shape: tuple[int, int, int] = (3, 32, 32)) -> Tensor:
    """Samples of a K-step SiD generator (§2: fresh noise, no CFG): (N, *shape) clamped to [-1, 1], N = len(cond)."""
    from sid_fast.sampler import few_step_sample

    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(cond), *shape, generator=rng)
    images = [few_step_sample(generator, noise[i:i + batch_size], cond[i:i + batch_size], num_steps, rng=rng)
              for i in range(0, len(cond), batch_size)]
    return torch.cat(images).clamp(-1, 1)


def rendered_truth(prompts: list[str | PromptSpec], count: int, seed: int = 0, resolution: int = 32) -> Tensor:
    """`count` ground-truth images (count, 3, R, R) in [-1, 1]: image i renders prompt i mod len(prompts) (captions
    are parsed) in its own random layout, drawn from one `random.Random(seed)`; the reference of the in-loop
    `shapes` metric's Fréchet distance."""
    from sid_fast.shapes.captions import parse_caption
    from sid_fast.shapes.world import render_batch, sample_scene

    if not prompts:
        raise ValueError("rendered_truth: no prompts")
    specs = [parse_caption(p) if isinstance(p, str) else p for p in prompts]
    rng = random.Random(seed)
    return render_batch([sample_scene(specs[i % len(specs)], rng, resolution) for i in range(count)])
