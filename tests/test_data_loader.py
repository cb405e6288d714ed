"""The shard reader (sid_fast/data/loader.py): partition over ranks × workers, seeded order, exact resume, bad data."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from webdataset import TarWriter

from sid_fast.data import BadDataError, ShardManifest, ShardStream, prepare_prompts
from sid_fast.data.format import encode_tensors
from sid_fast.data.loader import reader_shards
from sid_fast.data.tiny import TinyPromptEncoder

WORDS = "red blue green cat dog tree sky runs the a big small house car bird over".split()
N_PROMPTS, PER_SHARD = 60, 5


def write_prompts(path: Path, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for i in range(n)]
    path.write_text("\n".join(prompts) + "\n")
    return prompts


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    write_prompts(root / "prompts.txt", N_PROMPTS)
    prepare_prompts(root / "prompts.txt", root / "shards", TinyPromptEncoder(), samples_per_shard=PER_SHARD,
                    batch_size=16, progress=False)
    return root / "shards"


def epoch_keys(directory, reader=0, readers=1, **options) -> list[str]:
    return [sample["key"] for sample in ShardStream(directory, reader, readers, **options).iter_epoch()]


def all_keys(directory) -> list[str]:
    return [f"{i:09d}" for i in range(ShardManifest.load(directory).count)]


def test_two_ranks_two_workers_read_every_sample_once(shards):
    # reader = rank * workers + worker, as ShardConditions assigns them
    seen = []
    for rank in range(2):
        for worker in range(2):
            keys = epoch_keys(shards, rank * 2 + worker, 4, seed=3, shuffle_buffer=7)
            assert keys, f"reader {rank * 2 + worker} got no samples"
            seen += keys
    assert sorted(seen) == all_keys(shards)
    assert len(seen) == len(set(seen))


def test_same_seed_same_order_other_seed_other_order(shards):
    first = epoch_keys(shards, seed=5, shuffle_buffer=8)
    assert first == epoch_keys(shards, seed=5, shuffle_buffer=8)
    assert sorted(first) == all_keys(shards) and first != sorted(first)
    assert epoch_keys(shards, seed=6, shuffle_buffer=8) != first
    stream = ShardStream(shards, seed=5, shuffle_buffer=8)
    assert [s["key"] for s in stream.iter_epoch()] == first
    assert [s["key"] for s in stream.iter_epoch()] != first  # the next epoch is reshuffled


@pytest.mark.parametrize("stop", [0, 1, 9, 23, N_PROMPTS // 2 - 1, N_PROMPTS // 2, N_PROMPTS // 2 + 5])
def test_resume_yields_exactly_the_remaining_samples(shards, stop):
    options = dict(seed=1, shuffle_buffer=10)
    expected = [s["key"] for _, s in zip(range(N_PROMPTS), ShardStream(shards, 1, 2, **options), strict=False)]  # crosses an epoch
    stream = iter(first := ShardStream(shards, 1, 2, **options))
    head = [next(stream)["key"] for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # what goes into state.json
    resumed = ShardStream(shards, 1, 2, state=state, **options)
    tail = [s["key"] for _, s in zip(range(N_PROMPTS - stop), resumed, strict=False)]
    assert head + tail == expected


def rewrite_sample(path: Path, key: str, change) -> None:
    """Rewrite tar `path` with sample `key`'s tensors replaced by change(tensors)."""
    with tarfile.open(path) as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]
    buffer = io.BytesIO()
    with TarWriter(buffer, mtime=0) as writer:
        samples: dict[str, dict] = {}
        for name, data in members:
            stem, ext = name.split(".", 1)
            samples.setdefault(stem, {"__key__": stem})[ext] = data
        for stem, sample in samples.items():
            if stem == key:
                sample["safetensors"] = encode_tensors(change(load_safetensors(sample["safetensors"])))
            writer.write(sample)
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def damaged(shards, tmp_path) -> tuple[Path, dict]:
    """A copy of the shards with one truncated shard, one wrong-shape sample and one NaN sample."""
    directory = tmp_path / "damaged"
    shutil.copytree(shards, directory)
    manifest = ShardManifest.load(directory)
    truncated = directory / manifest.shards[2]["name"]
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    rewrite_sample(directory / manifest.shards[0]["name"], f"{1:09d}",
                   lambda t: dict(t, embeds=torch.zeros(t["embeds"].shape[0] + 1, t["embeds"].shape[1], dtype=t["embeds"].dtype)))
    rewrite_sample(directory / manifest.shards[5]["name"], f"{5 * PER_SHARD + 3:09d}",
                   lambda t: dict(t, pooled=torch.full_like(t["pooled"], float("nan"))))
    return directory, {"truncated": truncated.name}


def test_truncated_shard_and_bad_samples_are_skipped_and_counted(damaged):
    directory, info = damaged
    seen, bad = [], {}
    for reader in range(2):
        stream = ShardStream(directory, reader, 2, seed=0, shuffle_buffer=4, max_bad_fraction=0.5)
        seen += [s["key"] for s in stream.iter_epoch()]
        for kind, count in stream.state_dict()["bad"].items():
            bad[kind] = bad.get(kind, 0) + count
    truncated_keys = {f"{2 * PER_SHARD + i:09d}" for i in range(PER_SHARD)}
    readable_of_truncated = truncated_keys & set(seen)
    assert 0 < len(readable_of_truncated) < PER_SHARD  # the samples before the cut are read
    lost = PER_SHARD - len(readable_of_truncated)
    expected = set(all_keys(directory)) - {f"{1:09d}", f"{5 * PER_SHARD + 3:09d}"} - (truncated_keys - readable_of_truncated)
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    assert bad == {"damaged_tar": lost, "shape": 1, "nonfinite": 1}


def test_too_much_bad_data_stops_naming_the_shard(damaged):
    directory, info = damaged
    # the first bad event of a reader whose epoch holds the truncated shard crosses a zero tolerance
    with pytest.raises(BadDataError, match="shard .*shard-0000") as error:
        for reader in range(2):
            list(ShardStream(directory, reader, 2, seed=0, shuffle_buffer=4, max_bad_fraction=0.0).iter_epoch())
    assert "max_bad_fraction=0.0" in str(error.value)
    # one reader, no shuffle buffer: the first damaged shard in this epoch's shard order is the one named
    names = [s["name"] for s in ShardManifest.load(directory).shards]
    damaged_names = {info["truncated"], names[0], names[5]}
    first = next(names[i] for i in reader_shards(len(names), 0, 0, 0, 1) if names[i] in damaged_names)
    with pytest.raises(BadDataError, match=f"shard {directory / first}"):
        list(ShardStream(directory, 0, 1, seed=0, shuffle_buffer=0, max_bad_fraction=0.0).iter_epoch())


def test_corrupt_header_in_the_middle_is_detected(shards, tmp_path):
    directory = tmp_path / "corrupt"
    shutil.copytree(shards, directory)
    path = directory / ShardManifest.load(directory).shards[1]["name"]
    data = bytearray(path.read_bytes())
    data[3 * 1024 + 100: 3 * 1024 + 140] = b"x" * 40  # garbage in the third sample's first header or data
    path.write_bytes(bytes(data))
    stream = ShardStream(directory, seed=0, shuffle_buffer=0, max_bad_fraction=1.0)
    keys = [s["key"] for s in stream.iter_epoch()]
    # each sample is 3 KiB (two 512-byte headers + padded data): the second sample's header is hit, one sample survives
    assert stream.state_dict()["bad"] == {"damaged_tar": PER_SHARD - 1}
    assert sorted(keys) == sorted(set(all_keys(directory)) - {f"{PER_SHARD + i:09d}" for i in range(1, PER_SHARD)})


def test_too_few_shards_for_the_readers(shards):
    with pytest.raises(ValueError, match="cannot feed"):
        ShardStream(shards, 0, N_PROMPTS // PER_SHARD + 1)
