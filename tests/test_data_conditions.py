"""ShardConditions (sid_fast/data/conditions.py): the trainer's ConditionSource over shards, with workers and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ranks import RANK_TIMEOUT_S, run_ranks
from torch import nn

from sid_fast.config import DataConfig, MethodConfig, SiDConfig, TrainConfig, load_config
from sid_fast.data import ShardConditions, ShardError, build_conditions, prepare_images, prepare_prompts
from sid_fast.data.encoding import VAELatentEncoder
from sid_fast.data.tiny import TinyPromptEncoder, tiny_vae
from sid_fast.engine import LocalEngine
from sid_fast.models.protocol import Conditioning, ConditionSource
from sid_fast.trainer import SiDTrainer

N, PER_SHARD = 48, 4  # 12 shards: 6 per reader with 2 readers, 3 per reader with 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conditions")
    (root / "p.txt").write_text("\n".join(f"prompt number {i} with a cat" for i in range(N)) + "\n")
    prepare_prompts(root / "p.txt", root / "shards", TinyPromptEncoder(), samples_per_shard=PER_SHARD, progress=False)
    return root / "shards"


def draw(conditions: ShardConditions, sizes) -> list[str]:
    return [key for size in sizes for key in conditions.next_batch(size).keys]


def test_workers_serve_every_sample_once_and_resume_in_the_same_order(shards):
    options = dict(num_workers=2, seed=4, shuffle_buffer=5, chunk=3)
    reference = ShardConditions(shards, **options)
    assert isinstance(reference, ConditionSource)
    expected = draw(reference, [7] * 10)  # 70 samples: one epoch (48) and into the next
    assert sorted(expected[:N]) == [f"{i:09d}" for i in range(N)]
    reference.close()
    for stop in (5, 6, 31):  # mid-chunk, chunk boundary, and later
        first = ShardConditions(shards, **options)
        head = draw(first, [stop])
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = ShardConditions(shards, **options)
        resumed.load_state_dict(state)
        assert head + draw(resumed, [70 - stop]) == expected, stop
        resumed.close()


def test_two_ranks_split_the_epoch_and_resume_from_one_merged_state(shards):
    ranks = [ShardConditions(shards, rank=r, world_size=2, num_workers=0, seed=1, shuffle_buffer=3) for r in range(2)]
    halves = [draw(c, [5, 5, 2]) for c in ranks]  # 12 of each rank's 24
    merged = ranks[0].state_dict()
    merged["ranks"].update(ranks[1].state_dict()["ranks"])  # what the all-gather under torch.distributed assembles
    state = json.loads(json.dumps(merged))
    for r, conditions in enumerate(ranks):
        resumed = ShardConditions(shards, rank=r, world_size=2, num_workers=0, seed=1, shuffle_buffer=3)
        resumed.load_state_dict(state)
        halves[r] += draw(resumed, [12])
        assert draw(conditions, [12]) == halves[r][12:]
    assert sorted(halves[0] + halves[1]) == [f"{i:09d}" for i in range(N)]
    with pytest.raises(ValueError, match="num_workers=1, this run has 2"):
        ShardConditions(shards, rank=0, world_size=2, num_workers=2, seed=1, shuffle_buffer=3).load_state_dict(state)


def test_refuses_shards_of_another_teacher(shards):
    with pytest.raises(ShardError, match="prepared for teacher 'tiny-d32-l16-v1024-seed0'.*teacher is 'sd3:/models/x'"):
        ShardConditions(shards, teacher_id="sd3:/models/x")


def test_unconditional_and_dtype(shards):
    encoder = TinyPromptEncoder()
    conditions = ShardConditions(shards, teacher_id=encoder.teacher_id, num_workers=0, dtype=torch.float32)
    uncond = conditions.unconditional(3)
    assert uncond.embeds.shape == (3, 16, 32) and uncond.embeds.dtype == torch.float32
    assert torch.equal(uncond.embeds[2], encoder.unconditional().embeds[0].to(torch.bfloat16).float())
    batch = conditions.sample(5, torch.Generator())
    assert batch.embeds.dtype == torch.float32 and batch.mask.dtype == torch.int64 and len(batch) == 5
    with pytest.raises(ShardError, match="without latents"):
        conditions.sample_with_latents(2)


def test_image_shards_give_latents_with_their_captions(tmp_path):
    import io

    from PIL import Image

    (tmp_path / "in").mkdir()
    for i in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(buffer, format="PNG")
        (tmp_path / "in" / f"{i}.png").write_bytes(buffer.getvalue())
        (tmp_path / "in" / f"{i}.txt").write_text(f"red level {i}")
    encoder = TinyPromptEncoder()
    prepare_images(tmp_path / "in", tmp_path / "out", encoder, VAELatentEncoder(tiny_vae(), encoder.teacher_id, 8),
                   samples_per_shard=3, progress=False)
    conditions = ShardConditions(tmp_path / "out", num_workers=0, shuffle_buffer=0)
    latents, cond = conditions.sample_with_latents(6)
    assert latents.shape == (6, 4, 4, 4) and cond.embeds.shape == (6, 16, 32)
    first = conditions.next_batch(6)
    by_prompt = dict(zip(first.prompts, first.latents, strict=True))
    assert len(by_prompt) == 6  # a full second epoch, each caption once, latents differ per image
    assert not torch.equal(by_prompt["red level 0"], by_prompt["red level 5"])


def test_data_config_validates_and_builds(shards, tmp_path):
    with pytest.raises(ValueError, match="data.shards"):
        DataConfig(shards=str(tmp_path))
    with pytest.raises(ValueError, match="data.max_bad_fraction"):
        DataConfig(max_bad_fraction=1.5)
    config = load_config(overrides=[f"data.shards={shards}", "data.num_workers=0", "data.shuffle_buffer=4", "train.seed=3"])
    conditions = build_conditions(config.data, TinyPromptEncoder().teacher_id, default_seed=config.train.seed)
    assert conditions.seed == 3 and conditions.shuffle_buffer == 4 and conditions.num_workers == 0


class PooledVelocity(nn.Module):
    """v(x_t, t, c) = Linear([x_t, pooled text, t]) on 2-D toy data."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2 + 32 + 1, 2)

    def forward(self, x_t, t, cond: Conditioning):
        return self.linear(torch.cat([x_t, cond.pooled.float(), t[:, None]], dim=1))


def test_trainer_checkpoints_and_resumes_the_data_position(shards, tmp_path):
    def trainer(iterations: int) -> SiDTrainer:
        config = SiDConfig(method=MethodConfig(num_steps=1),
                           train=TrainConfig(iterations=iterations, batch_size=3, out_dir=str(tmp_path / "run"), progress=False))
        teacher = PooledVelocity()
        teacher.load_state_dict(PooledVelocity().state_dict())
        engine = LocalEngine(teacher, PooledVelocity(), PooledVelocity(), config.optim)
        conditions = ShardConditions(shards, teacher_id=TinyPromptEncoder().teacher_id, num_workers=0, seed=2)
        return SiDTrainer(config, engine, conditions, (2,))

    first = trainer(2)
    first.fit()  # 2 iterations x (fake + generator) x 3 samples = 12 samples, checkpoint at the end
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert saved["conditions"]["ranks"]["0"]["readers"]["0"]["served"] == 12
    resumed = trainer(2)
    assert resumed.resume()
    assert resumed.conditions.next_batch(5).keys == first.conditions.next_batch(5).keys


def _distributed_rank(rank: int, world_size: int, init_file: str, shards: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
    try:
        conditions = ShardConditions(shards, num_workers=0, seed=1, shuffle_buffer=3)  # rank and world from torch.distributed
        keys = draw(conditions, [5, 4])
        state = conditions.state_dict()  # collective: every rank calls it, as the trainer's save() does
        later = draw(conditions, [6])
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": conditions.rank, "world_size": conditions.world_size,
                                                             "keys": keys, "state": state, "later": later}))
    finally:
        dist.destroy_process_group()


def test_under_torch_distributed_the_state_holds_every_rank(shards, tmp_path):
    run_ranks(_distributed_rank, (2, str(tmp_path / "init"), str(shards), str(tmp_path)), nprocs=2)
    missing = [rank for rank in range(2) if not (tmp_path / f"rank{rank}.json").is_file()]
    assert not missing, f"rank(s) {missing} exited without a result (interrupted?)"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    state = results[0]["state"]  # what rank 0 writes into state.json
    assert state == results[1]["state"] and sorted(state["ranks"]) == ["0", "1"]
    for rank, result in enumerate(results):
        same = ShardConditions(shards, rank=rank, world_size=2, num_workers=0, seed=1, shuffle_buffer=3)
        assert draw(same, [5, 4]) == result["keys"]  # explicit ranks in one process read what the real ranks read
        resumed = ShardConditions(shards, rank=rank, world_size=2, num_workers=0, seed=1, shuffle_buffer=3)
        resumed.load_state_dict(state)
        assert draw(resumed, [6]) == result["later"]
