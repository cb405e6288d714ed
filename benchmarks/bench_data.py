"""Data throughput: `prepare` (prompts/s with the tiny encoder), the shard reader and ShardConditions (samples/s,
MB/s) from local shards, against the rate a SiD iteration on the tiny SD3 DiT consumes samples.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_data.py --benchmark-columns=median,rounds
    (rates in extra_info; `--benchmark-json out.json` keeps them)
"""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from sid_fast.data import ShardConditions, ShardManifest, ShardStream, prepare_prompts
from sid_fast.data.tiny import TinyPromptEncoder
from sid_fast.models.protocol import Conditioning

WORDS = "a red blue green big small cat dog tree house over under the sky river with two three".split()


def write_prompts(path, n: int) -> None:
    path.write_text("\n".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 9)) for i in range(n)) + "\n")


class RandomEncoder:
    """Random embeddings of a given per-sample shape (what a real encoder stores, without its cost)."""

    teacher_id = "random"

    def __init__(self, length: int, dim: int, pooled: int):
        self.length, self.dim, self.pooled = length, dim, pooled

    def encode(self, prompts):
        n = len(prompts)
        return Conditioning(embeds=torch.randn(n, self.length, self.dim), pooled=torch.randn(n, self.pooled))

    def unconditional(self):
        return self.encode([""])


SIZES = {  # name -> (samples, L, D, pooled): tiny test size, and SD3's real text-embedding size (333 x 4096, 2048)
    "tiny-16x32": (2048, 16, 32, 32),
    "sd3-333x4096": (48, 333, 4096, 2048),
}


@pytest.fixture(scope="module", params=list(SIZES))
def shards(request, tmp_path_factory):
    n, length, dim, pooled = SIZES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    write_prompts(root / "p.txt", n)
    prepare_prompts(root / "p.txt", root / "shards", RandomEncoder(length, dim, pooled), samples_per_shard=max(n // 8, 1),
                    batch_size=16, progress=False)
    return root / "shards"


def _megabytes(directory) -> float:
    return sum(s["bytes"] for s in ShardManifest.load(directory).shards) / 1e6


def test_prepare_prompts_tiny_encoder(benchmark, tmp_path):
    n = 1024
    write_prompts(tmp_path / "p.txt", n)
    encoder = TinyPromptEncoder()
    runs = itertools.count()

    def setup():
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        return (tmp_path / "p.txt", tmp_path / f"out{next(runs)}", encoder), dict(batch_size=64, samples_per_shard=256, progress=False)

    benchmark.pedantic(prepare_prompts, setup=setup, rounds=3)
    benchmark.extra_info["prompts_per_s"] = n / benchmark.stats.stats.median


def test_reader_one_epoch(benchmark, shards):
    count = ShardManifest.load(shards).count

    def epoch():
        return sum(1 for _ in ShardStream(shards, seed=0, shuffle_buffer=1000).iter_epoch())

    assert benchmark.pedantic(epoch, rounds=3, warmup_rounds=1) == count
    benchmark.extra_info["samples_per_s"] = count / benchmark.stats.stats.median
    benchmark.extra_info["MB_per_s"] = _megabytes(shards) / benchmark.stats.stats.median


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_conditions_batches(benchmark, shards, workers):
    count = ShardManifest.load(shards).count
    batch = min(64, count // 4)
    conditions = ShardConditions(shards, num_workers=workers, seed=0)
    conditions.sample(batch)  # start the workers outside the timing

    def draw():
        for _ in range(count // batch):
            conditions.sample(batch)

    benchmark.pedantic(draw, rounds=3, warmup_rounds=1)
    conditions.close()
    samples = (count // batch) * batch
    benchmark.extra_info["samples_per_s"] = samples / benchmark.stats.stats.median
    benchmark.extra_info["MB_per_s"] = _megabytes(shards) * samples / count / benchmark.stats.stats.median


def test_sid_iteration_consumption_tiny_sd3(benchmark, tmp_path):
    """Samples a SiD iteration on the tiny SD3 DiT consumes per second (2 batches: fake step + generator step)."""
    from sid_fast.api import init_student
    from sid_fast.config import load_config
    from sid_fast.engine import LocalEngine
    from sid_fast.models.registry import build_teacher
    from sid_fast.trainer import SiDTrainer

    batch = 16
    config = load_config(overrides=["teacher.kind=sd3", "teacher.preset=tiny", f"train.batch_size={batch}",
                                    "train.progress=false", f"train.out_dir={tmp_path}"])
    bundle = build_teacher(config.teacher)
    fake_score, generator = init_student(bundle.teacher, bundle.student)
    engine = LocalEngine(bundle.teacher, fake_score, generator, config.optim)
    trainer = SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)
    benchmark.pedantic(trainer.train_step, rounds=10, warmup_rounds=2)
    benchmark.extra_info["samples_per_s"] = 2 * batch / benchmark.stats.stats.median
