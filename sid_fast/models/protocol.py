"""The model protocol every teacher, fake score and generator follows.

A velocity model is an `nn.Module` called as `model(x_t, t, cond) -> velocity` where
  x_t: (B, ...) noisy sample in the model's own latent layout,
  t:   (B,) float time in [0, 1] (t = 1 is noise; adapters convert to the model's own timestep scale),
  cond: a `Conditioning` of batch B,
and the output has x_t's shape and follows the §1 sign convention v = eps - x0.
Everything model-specific (timestep scaling, packing, ids, masks, guidance embeddings) stays inside the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Per-sample conditioning, batched along dim 0. Every field is optional.

    embeds:   (B, L, D) text-encoder hidden states (`encoder_hidden_states`).
    pooled:   (B, P) pooled text embedding (SD3 `pooled_projections`, FLUX CLIP pooled).
    mask:     (B, L) attention mask of `embeds` (SANA); 1 = keep.
    labels:   (B,) integer class labels for class-conditional toy models; -1 = unconditional.
    guidance: (B,) guidance-embedding value (FLUX.1-dev); None elsewhere.
    """

    embeds: Tensor | None = None
    pooled: Tensor | None = None
    mask: Tensor | None = None
    labels: Tensor | None = None
    guidance: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __post_init__(self) -> None:
        sizes = {name: value.shape[0] for name, value in self.tensors().items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning fields disagree on batch size: {sizes}")

    def __len__(self) -> int:
        tensors = self.tensors()
        if not tensors:
            raise ValueError("empty Conditioning has no batch size")
        return next(iter(tensors.values())).shape[0]

    def map(self, fn) -> Conditioning:
        """Apply `fn` to every tensor field and return a new Conditioning."""
        return replace(self, **{name: fn(value) for name, value in self.tensors().items()})

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> Conditioning:
        """Move to `device`; floating-point fields also cast to `dtype` when given. `non_blocking` copies CPU
        tensors to an accelerator through pinned memory without waiting for the device (no host sync)."""

        def move(value: Tensor) -> Tensor:
            if non_blocking and value.device.type == "cpu" and torch.device(device).type == "cuda":
                value = value.pin_memory()
            if dtype is not None and value.is_floating_point():
                return value.to(device=device, dtype=dtype, non_blocking=non_blocking)
            return value.to(device=device, non_blocking=non_blocking)

        return self.map(move)

    def nbytes(self) -> int:
        """Bytes of all tensor fields."""
        return sum(v.numel() * v.element_size() for v in self.tensors().values())

    def __getitem__(self, index) -> Conditioning:
        return self.map(lambda value: value[index])

    def with_guidance(self, value: float) -> Conditioning:
        n = len(self)
        device = next(iter(self.tensors().values())).device
        return replace(self, guidance=torch.full((n,), float(value), device=device))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch; all items must carry the same fields."""
        names = [tuple(sorted(item.tensors())) for item in items]
        if len(set(names)) != 1:
            raise ValueError(f"cannot concatenate Conditionings with different fields: {names}")
        return Conditioning(**{name: torch.cat([getattr(i, name) for i in items]) for name in names[0]})

    def expand_to(self, batch_size: int) -> Conditioning:
        """Repeat a batch-1 conditioning (e.g. the stored empty-prompt embedding) to `batch_size`."""
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise ValueError(f"can only expand a batch-1 Conditioning, got batch {len(self)}")
        return self.map(lambda value: value.expand(batch_size, *value.shape[1:]))


@runtime_checkable
class VelocityModel(Protocol):
    """(x_t, t, cond) -> velocity in the §1 convention. See the module docstring."""

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...


@runtime_checkable
class ConditionSource(Protocol):
    """Where conditionings come from during distillation (prompt shards, class labels, ...).

    `sample(batch_size, generator)` returns a conditional batch; `unconditional(batch_size)` the matching
    unconditional batch (the encoded empty prompt, §1). `state_dict`/`load_state_dict` hold the position
    so that a resumed run continues exactly where it stopped.
    """

    def sample(self, batch_size: int, generator: torch.Generator) -> Conditioning: ...

    def unconditional(self, batch_size: int) -> Conditioning: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
