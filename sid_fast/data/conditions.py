"""`ShardConditions`: the trainer's `ConditionSource` on top of prepared shards, with DataLoader workers.

Worker w of rank r plays reader r·W + (w + rotation) mod W (loader.py). Workers send chunks of samples stacked,
each with the reader's state after it; the main process records the state of the last sample it consumed,
so prefetched but unconsumed samples are not counted and a resumed run continues with exactly the
remaining samples. DataLoader serves workers round-robin; chunk boundaries fall at multiples of `chunk`
served samples and the state records which worker comes next, so the resumed order equals the uninterrupted one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sid_fast.data.format import UNCONDITIONAL, ShardError, ShardManifest, check_teacher, sha256_file
from sid_fast.data.loader import ShardStream
from sid_fast.errors import ConfigError
from sid_fast.models.protocol import Conditioning

COND_FIELDS = ("embeds", "pooled", "mask")
STATE_FORMAT = 1


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit (rank, world_size), else torch.distributed's when initialised (DeepSpeed too), else (0, 1)."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    return rank, world_size


def _identity(item):
    return item


class _ReaderDataset(IterableDataset):
    """Yields (reader, chunk) with chunk = {"key": [...], "prompt": [...], field: (n, ...) tensor, "state": [...]}."""

    def __init__(self, directory: Path, manifest: ShardManifest, rank: int, world_size: int, workers: int,
                 states: dict[str, dict], rotation: int, seed: int, shuffle_buffer: int, max_bad_fraction: float, chunk: int):
        super().__init__()
        self.directory, self.manifest, self.rank, self.world_size, self.workers = directory, manifest, rank, world_size, workers
        self.states, self.rotation, self.chunk = states, rotation, chunk
        self.options = dict(seed=seed, shuffle_buffer=shuffle_buffer, max_bad_fraction=max_bad_fraction)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = self.rank * self.workers + (worker + self.rotation) % self.workers
        stream = ShardStream(self.directory, reader, self.world_size * self.workers, state=self.states.get(str(reader)),
                             manifest=self.manifest, **self.options)
        samples, states = [], []
        for sample in stream:
            samples.append(sample)
            states.append(stream.state_dict())
            if stream.served % self.chunk == 0:  # one stacked tensor per field crosses the process boundary
                yield reader, _stack(samples, states) if info is not None else dict(_columns(samples), state=states)
                samples, states = [], []


def _columns(samples: list[dict]) -> dict[str, list]:
    return {name: [s[name] for s in samples] for name in samples[0]}


def _stack(samples: list[dict], states: list[dict]) -> dict:
    out = {"state": states}
    for name in samples[0]:
        values = [s[name] for s in samples]
        out[name] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out


@dataclass
class ShardBatch:
    """One batch from the shards: prompts, their conditioning, and latents (B, C, h, w) for image shards."""

    prompts: list[str]
    keys: list[str]
    conditioning: Conditioning
    latents: Tensor | None


class ShardConditions:
    """A `ConditionSource` streaming prepared shards (prompt or image shards).

    directory: a finished shard directory; teacher_id: refuse shards made for another teacher (None: no check);
    rank/world_size: explicit, else from torch.distributed; num_workers: DataLoader worker processes per rank
    (0: read in this process); dtype: cast floating outputs (None: the stored dtype).
    `sample` ignores the trainer's generator: the order is a function of `seed` and the position alone.
    """

    def __init__(self, directory: str | Path, *, teacher_id: str | None = None, rank: int | None = None,
                 world_size: int | None = None, num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.01, dtype: torch.dtype | None = None, chunk: int = 16):
        self.directory = Path(directory)
        self.manifest = ShardManifest.load(self.directory)
        if teacher_id is not None:
            check_teacher(self.manifest, teacher_id, self.directory)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.workers = max(num_workers, 1)
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.max_bad_fraction, self.dtype, self.chunk = max_bad_fraction, dtype, chunk
        if len(self.manifest.shards) < self.world_size * self.workers:
            raise ShardError(f"{self.directory}: {len(self.manifest.shards)} shards cannot feed world_size × workers = "
                             f"{self.world_size} × {self.workers} readers; prepare with a smaller --samples-per-shard")
        uncond_path = self.directory / UNCONDITIONAL
        if not uncond_path.is_file() or sha256_file(uncond_path) != self.manifest.unconditional_sha256:
            raise ShardError(f"{uncond_path} is missing or fails its sha256 check against the manifest")
        self._uncond = self._cast(Conditioning(**load_file(uncond_path)))
        self._states: dict[str, dict] = {}
        self._next_worker = 0
        self._pending: deque = deque()
        self._iterator = None

    # ---------------------------------------------------------------- ConditionSource

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Conditioning:
        return self.next_batch(batch_size).conditioning

    def unconditional(self, batch_size: int) -> Conditioning:
        return self._uncond.expand_to(batch_size)

    def sample_with_latents(self, batch_size: int) -> tuple[Tensor, Conditioning]:
        """(latents (B, C, h, w), conditioning) for data-aided training (§5); needs image shards."""
        if "latents" not in self.manifest.fields:
            raise ShardError(f"{self.directory} holds {self.manifest.kind} shards without latents; prepare images for data-aided runs")
        batch = self.next_batch(batch_size)
        return batch.latents, batch.conditioning

    def state_dict(self) -> dict:
        """{"ranks": {rank: {"readers": {reader: state}, "next_worker": w}}, ...}; gathered from all ranks under
        torch.distributed, so rank 0's state.json resumes every rank."""
        mine = {"readers": dict(self._states), "next_worker": self._next_worker}
        ranks = {str(self.rank): mine}
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            ranks = {str(r): s for r, s in enumerate(gathered)}
        return {"format": STATE_FORMAT, "world_size": self.world_size, "num_workers": self.workers, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        for name, mine in (("world_size", self.world_size), ("num_workers", self.workers), ("seed", self.seed),
                           ("shuffle_buffer", self.shuffle_buffer)):
            if state.get(name) != mine:
                raise ConfigError(f"data loader state was saved with {name}={state.get(name)}, this run has {mine}; "
                                  "resume with the same data settings")
        if str(self.rank) not in state["ranks"]:
            raise ValueError(f"data loader state has no entry for rank {self.rank} (has {sorted(state['ranks'])})")
        mine = state["ranks"][str(self.rank)]
        self.close()
        self._states, self._next_worker = dict(mine["readers"]), int(mine["next_worker"])

    # ---------------------------------------------------------------- batches

    def next_batch(self, batch_size: int) -> ShardBatch:
        samples = [self._next_sample() for _ in range(batch_size)]
        fields = {name: torch.stack([s[name] for s in samples]) for name in self.manifest.fields}
        cond = self._cast(Conditioning(**{n: v for n, v in fields.items() if n in COND_FIELDS}))
        latents = fields.get("latents")
        if latents is not None and self.dtype is not None:
            latents = latents.to(self.dtype)
        return ShardBatch([s["prompt"] for s in samples], [s["key"] for s in samples], cond, latents)

    def stats(self) -> dict[str, int]:
        """Samples served and bad samples skipped (by kind) over this rank's readers, as consumed so far."""
        out = {"served": sum(s["served"] for s in self._states.values())}
        for state in self._states.values():
            for kind, count in state["bad"].items():
                out[f"bad_{kind}"] = out.get(f"bad_{kind}", 0) + count
        return out

    def summary(self) -> str:
        stats = self.stats()
        bad = {k.removeprefix("bad_"): v for k, v in stats.items() if k.startswith("bad_")}
        return f"data: {stats['served']} samples served on rank {self.rank}, {sum(bad.values())} bad skipped {bad or ''}".rstrip()

    def close(self) -> None:
        """Stop the worker processes (a later batch starts them again from the recorded state)."""
        # DataLoader's own shutdown, now: left to garbage collection after an error in a worker, it waited 5 s
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator, self._pending = None, deque()

    def _cast(self, cond: Conditioning) -> Conditioning:
        return cond.to(dtype=self.dtype) if self.dtype is not None else cond

    def _start(self) -> None:
        dataset = _ReaderDataset(self.directory, self.manifest, self.rank, self.world_size, self.workers, dict(self._states),
                                 self._next_worker, self.seed, self.shuffle_buffer, self.max_bad_fraction, self.chunk)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            prefetch_factor=4 if self.num_workers else None)
        self._iterator = iter(loader)

    def _next_sample(self) -> dict:
        if not self._pending:
            if self._iterator is None:
                self._start()
            reader, chunk = next(self._iterator)
            states = chunk.pop("state")
            for i, state in enumerate(states):
                self._pending.append((reader, {name: values[i] for name, values in chunk.items()}, state))
        reader, sample, state = self._pending.popleft()
        self._states[str(reader)] = state
        worker = reader - self.rank * self.workers  # logical worker
        self._next_worker = worker if self._pending else (worker + 1) % self.workers
        return sample


def build_conditions(data, teacher_id: str | None, default_seed: int = 0, rank: int | None = None,
                     world_size: int | None = None, dtype: torch.dtype | None = None) -> ShardConditions:
    """A ShardConditions from a `DataConfig` (config.py); `data.seed` None falls back to `default_seed` (train.seed)."""
    if data.shards is None:
        raise ConfigError("config field data.shards: no shard directory given")
    return ShardConditions(data.shards, teacher_id=teacher_id, rank=rank, world_size=world_size,
                           num_workers=data.num_workers, seed=default_seed if data.seed is None else data.seed,
                           shuffle_buffer=data.shuffle_buffer, max_bad_fraction=data.max_bad_fraction, dtype=dtype)
