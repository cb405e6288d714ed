"""ShapesWorld costs: rendering a training batch, checking images, and one flow-matching step of the teacher.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_shapes.py --benchmark-columns=median,rounds
    (per-item rates in extra_info; `--benchmark-json out.json` keeps them)
"""

from __future__ import annotations

import random

import pytest
import torch

from sid_fast.shapes.captions import caption_set
from sid_fast.shapes.checker import check_batch
from sid_fast.shapes.world import render_batch, sample_scene

PAIRS = caption_set(1, "train")[::50] + caption_set(2, "train")[::50]


def _scenes(count: int, seed: int = 0):
    rng = random.Random(seed)
    return [sample_scene(PAIRS[rng.randrange(len(PAIRS))][1], rng) for _ in range(count)]


def test_render_batch_64(benchmark):
    scenes = _scenes(64)
    images = benchmark(render_batch, scenes)
    benchmark.extra_info["images_per_s"] = 64 / benchmark.stats.stats.median
    assert images.shape == (64, 3, 32, 32)


def test_check_batch_64(benchmark):
    scenes = _scenes(64, seed=1)
    images = render_batch(scenes)
    rng = random.Random(1)
    specs = [PAIRS[rng.randrange(len(PAIRS))][1] for _ in range(64)]
    check_batch(images, specs)  # template cache warm
    benchmark(check_batch, images, specs)
    benchmark.extra_info["images_per_s"] = 64 / benchmark.stats.stats.median


@pytest.mark.parametrize("preset,batch", [("tiny", 64), ("base", 16)])
def test_teacher_flow_matching_step(benchmark, preset, batch):
    from sid_fast.models.protocol import Conditioning
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import shapes_transformer
    from sid_fast.pretrain import flow_matching_loss

    torch.set_flush_denormal(True)
    model = SD3Adapter(shapes_transformer(preset)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = render_batch(_scenes(batch))
    cond = Conditioning(embeds=torch.randn(batch, 20, 384), pooled=torch.randn(batch, 384))
    null = Conditioning(embeds=torch.zeros(batch, 20, 384), pooled=torch.zeros(batch, 384))
    rng = torch.Generator().manual_seed(0)

    def step():
        loss = flow_matching_loss(model, images, cond, null, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
