"""Generator EMA under ZeRO-3 and consolidation of partitioned weights.

Sharded EMA: each rank keeps the fp32 EMA of its own ZeRO-3 partition (`param.ds_tensor`), so an EMA
update is local (no all-gather per step) and costs 4 bytes per parameter / world size. To sample from or
export the EMA weights, the partitions are swapped into `ds_tensor` for the duration (ZeRO-3 then gathers
EMA weights on use) and swapped back. Unsharded EMA keeps a full fp32 copy on every rank (gathered per update).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def _zero_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if hasattr(p, "ds_tensor")]


def _release(module: nn.Module) -> None:
    """Free every gathered, non-persistent parameter so the next use re-gathers from `ds_tensor`."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    live = [p for _, p in _zero_params(module) if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist]
    if live:
        live[0].partition(param_list=live, has_been_updated=False)


def _refresh_persistent(module: nn.Module) -> None:
    """Re-gather persistent parameters after their partitions changed (as ZeRO-3 does after a step)."""
    persistent = [p for _, p in _zero_params(module) if p.ds_persist]
    if persistent:
        persistent[0].all_gather(param_list=persistent)


def full_from_partitions(partitions: list[Tensor], numel: int, shape: torch.Size) -> Tensor:
    """Concatenate the per-rank flat partitions of one parameter, drop the padding, reshape."""
    return torch.cat([part.flatten() for part in partitions])[:numel].reshape(shape)


def partition_of(full: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's flat ZeRO-3 partition of `full` (padded to a multiple of world_size)."""
    flat = full.flatten()
    size = -(-flat.numel() // world_size)
    flat = torch.cat([flat, flat.new_zeros(size * world_size - flat.numel())])
    return flat[rank * size:(rank + 1) * size].clone()


def gathered_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Full state dict on CPU, gathering one partitioned parameter at a time (peak: one layer)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        with GatheredParameters([value], enabled=hasattr(value, "ds_id")):
            out[name] = value.detach().contiguous().cpu().clone()
    return out


class ShardedEMA:
    """fp32 EMA of a ZeRO-3 module, decay min(decay, (1 + n) / (10 + n)) as `EMA` in base.py."""

    def __init__(self, module: nn.Module, decay: float, sharded: bool = True):
        self.decay, self.updates, self.sharded = decay, 0, sharded
        self.shadow = {name: value.float().clone() for name, value in self._values(module)}

    def _values(self, module: nn.Module):
        """(name, tensor) of what the EMA tracks: local partitions, or full parameters gathered."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        for name, p in _zero_params(module):
            if self.sharded:
                yield name, p.ds_tensor.data
            else:
                with GatheredParameters([p]):
                    yield name, p.data.detach().clone()

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        for name, value in self._values(module):
            self.shadow[name].lerp_(value.float(), 1 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module):
        """Within the context `module` computes with the EMA weights (all ranks must enter together)."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        _release(module)
        saved = {}
        with torch.no_grad():
            for name, p in _zero_params(module):
                saved[name] = p.ds_tensor.data.clone()
                if self.sharded:
                    p.ds_tensor.data.copy_(self.shadow[name].to(p.ds_tensor.dtype))
                else:
                    with GatheredParameters([p], modifier_rank=0):
                        p.data.copy_(self.shadow[name].to(p.dtype))
            _refresh_persistent(module)
        try:
            yield module
        finally:
            _release(module)
            with torch.no_grad():
                for name, p in _zero_params(module):
                    p.ds_tensor.data.copy_(saved[name])
                _refresh_persistent(module)

    # -------------------------------------------------------------- checkpoint

    def save(self, directory: Path, rank: int, world_size: int) -> None:
        if self.sharded:
            save_file({k: v.contiguous() for k, v in self.shadow.items()}, directory / f"generator_ema-rank{rank}.safetensors")
        elif rank == 0:
            save_file({k: v.contiguous() for k, v in self.shadow.items()}, directory / "generator_ema.safetensors")

    def load(self, directory: Path, module: nn.Module, rank: int, world_size: int, saved_world_size: int) -> None:
        """Load the EMA, re-partitioning it when the world size or the sharded flag changed."""
        full_file = directory / "generator_ema.safetensors"
        shard_files = [directory / f"generator_ema-rank{r}.safetensors" for r in range(saved_world_size)]
        if full_file.is_file():
            full = load_file(full_file)
        else:
            missing = [f.name for f in shard_files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{directory}: EMA is on but the checkpoint lacks {missing}")
            if self.sharded and saved_world_size == world_size:
                self.shadow = load_file(shard_files[rank])
                return
            shards = [load_file(f) for f in shard_files]
            params = dict(_zero_params(module))
            full = {name: full_from_partitions([s[name] for s in shards], params[name].ds_numel, params[name].ds_shape)
                    for name in shards[0]}
        self.shadow = {name: partition_of(value, rank, world_size) if self.sharded else value
                       for name, value in full.items()}


class SwappedWeights(nn.Module):
    """A module that runs `module` with the EMA weights swapped in (no grad); for sampling and evaluation."""

    def __init__(self, module: nn.Module, ema: ShardedEMA):
        super().__init__()
        self.inner = module
        self._ema = ema

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        with self._ema.swapped_in(self.inner):
            return self.inner(*args, **kwargs)
