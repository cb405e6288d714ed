"""One reader's deterministic, resumable stream over shards (format.py).

Readers: `world_size × num_workers` of them, reader r = rank·num_workers + worker. Each epoch the shard list is
permuted from (seed, epoch) and reader r takes every R-th shard, so the readers of one epoch together read
every shard exactly once. Within a reader, records (offsets only) pass a shuffle buffer seeded by
(seed, epoch, reader). The position is the number of records taken from the buffer this epoch; since the
buffer's decisions depend on record order alone, a resumed reader rebuilds the exact buffer from tar headers
(no data read) and continues with the remaining samples — no repeat, no skip.

Bad data (a truncated or corrupt tar, a shard deleted while the run streams it, an undecodable sample, a wrong
shape or dtype, NaN/inf) is skipped, counted by kind and logged; when a reader's bad samples in an epoch exceed
`max_bad_fraction` of the samples its shards hold, it raises `BadDataError` naming the shard.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from sid_fast.data.format import (
    BadSample,
    SampleRecord,
    ShardDamage,
    ShardError,
    ShardManifest,
    decode_sample,
    read_members,
    scan_tar,
)
from sid_fast.errors import UserError

log = logging.getLogger(__name__)
MAX_LOGGED_BAD = 20
OPEN_FILES = 8


class BadDataError(UserError):
    """Too much bad data: the message names the shard, the counts and the configured fraction (a UserError: the data
    the user gave is bad, one line on the CLI)."""


def mix_seed(*values: int) -> int:
    """A 64-bit seed from integers, stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(repr(tuple(int(v) for v in values)).encode()).digest()[:8], "little")


def reader_shards(num_shards: int, seed: int, epoch: int, reader: int, num_readers: int) -> list[int]:
    """Indices of the shards reader `reader` of `num_readers` reads in `epoch` (a partition over readers)."""
    order = list(range(num_shards))
    random.Random(mix_seed(seed, epoch)).shuffle(order)
    return order[reader::num_readers]


class ShardStream:
    """Samples of reader `reader` of `num_readers`, epoch after epoch (infinite) or one epoch (`iter_epoch`).

    Each sample is {"key": str, "prompt": str, <field>: tensor} with the manifest's fields (embeds (L, D),
    pooled (P,), mask (L,), latents (C, h, w)) in their stored dtypes.
    """

    def __init__(self, directory: str | Path, reader: int = 0, num_readers: int = 1, *, seed: int = 0,
                 shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01, state: dict | None = None,
                 manifest: ShardManifest | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or ShardManifest.load(self.directory)
        if len(self.manifest.shards) < num_readers:
            raise ShardError(f"{self.directory}: {len(self.manifest.shards)} shards cannot feed {num_readers} readers "
                             "(world_size × num_workers); prepare with a smaller --samples-per-shard or use fewer workers")
        if not 0 <= reader < num_readers:
            raise ValueError(f"reader {reader} out of range for {num_readers} readers")
        self.reader, self.num_readers = reader, num_readers
        self.seed, self.shuffle_buffer, self.max_bad_fraction = seed, shuffle_buffer, max_bad_fraction
        self.epoch = self.position = self.served = self.bad_in_epoch = 0
        self.bad: dict[str, int] = {}
        self._replaying = False
        self._expected = 0
        self._files: OrderedDict[int, object] = OrderedDict()
        if state:
            self.load_state_dict(state)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """JSON-serialisable position: epoch, records taken this epoch, samples served, bad counts."""
        return {"epoch": self.epoch, "position": self.position, "served": self.served,
                "bad_in_epoch": self.bad_in_epoch, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.served = int(state["epoch"]), int(state["position"]), int(state["served"])
        self.bad_in_epoch, self.bad = int(state["bad_in_epoch"]), dict(state["bad"])

    # ---------------------------------------------------------------- bad data

    def _count_bad(self, path: Path, kind: str, count: int, reason: str) -> None:
        if self._replaying or count == 0:
            return
        total_before = sum(self.bad.values())
        self.bad[kind] = self.bad.get(kind, 0) + count
        self.bad_in_epoch += count
        if total_before < MAX_LOGGED_BAD:
            log.warning("reader %d: skipping %d sample(s) of %s: %s", self.reader, count, path, reason)
        if self.bad_in_epoch > self.max_bad_fraction * self._expected:
            raise BadDataError(f"shard {path}: {reason}; reader {self.reader} has now skipped {self.bad_in_epoch} bad "
                               f"samples this epoch, more than data.max_bad_fraction={self.max_bad_fraction} of the "
                               f"{self._expected} samples its shards hold (bad by kind: {self.bad})")

    # ---------------------------------------------------------------- records

    def _take(self, buffer: list[SampleRecord], rng: random.Random) -> SampleRecord:
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        return buffer.pop()

    def _records(self, epoch: int) -> Iterator[SampleRecord]:
        """Records of `epoch` in shuffle-buffer order; a function of (seed, epoch, reader) and the tar headers only."""
        rng = random.Random(mix_seed(self.seed, epoch, self.reader, 1))
        buffer: list[SampleRecord] = []
        for shard in reader_shards(len(self.manifest.shards), self.seed, epoch, self.reader, self.num_readers):
            entry = self.manifest.shards[shard]
            path = self.directory / entry["name"]
            read = 0
            for item in scan_tar(path, shard):
                if isinstance(item, ShardDamage):
                    self._count_bad(path, item.kind, entry["count"] - item.read, item.reason)
                    break
                read += 1
                buffer.append(item)
                if len(buffer) > self.shuffle_buffer:
                    yield self._take(buffer, rng)
            else:
                if read > entry["count"]:
                    raise ShardError(f"shard {path} holds {read} samples, the manifest says {entry['count']}")
                self._count_bad(path, "missing", entry["count"] - read, f"{entry['count'] - read} samples missing")
        while buffer:
            yield self._take(buffer, rng)

    def _load(self, record: SampleRecord) -> dict | None:
        path = self.directory / self.manifest.shards[record.shard]["name"]
        handle = self._files.pop(record.shard, None)
        if handle is None:
            try:
                handle = open(path, "rb")
            except OSError as error:  # deleted or moved after its headers were read: this sample is lost
                self._count_bad(path, "missing_shard", 1, f"sample {record.key}: cannot open the shard "
                                                           f"({error.strerror or error})")
                return None
        self._files[record.shard] = handle
        while len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        try:
            sample = decode_sample(read_members(handle, record), self.manifest.fields)
        except BadSample as error:
            self._count_bad(path, error.kind, 1, f"sample {record.key}: {error}")
            return None
        sample["key"] = record.key
        return sample

    # ---------------------------------------------------------------- iteration

    def iter_epoch(self) -> Iterator[dict]:
        """The rest of the current epoch (all of it from position 0); then the stream moves to the next epoch."""
        shards = reader_shards(len(self.manifest.shards), self.seed, self.epoch, self.reader, self.num_readers)
        self._expected = sum(self.manifest.shards[s]["count"] for s in shards)
        records = self._records(self.epoch)
        self._replaying = True  # rebuild the buffer from headers; these records were served (or counted) already
        for _ in itertools.islice(records, self.position):
            pass
        self._replaying = False
        for record in records:
            self.position += 1
            sample = self._load(record)
            if sample is not None:
                self.served += 1
                yield sample
        self.epoch, self.position, self.bad_in_epoch = self.epoch + 1, 0, 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self.iter_epoch()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
