"""What the trainer needs from an engine: three networks, backward/step for the two trainable ones,
freezing, EMA, collective helpers and checkpoint state. The engine knows nothing of SiD.

Network names: "teacher" (frozen, no optimizer), "fake_score" and "generator" (each with its own Adam).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

TRAINABLE = ("fake_score", "generator")


class Engine(Protocol):
    teacher: nn.Module
    fake_score: nn.Module
    generator: nn.Module
    rank: int
    world_size: int
    device: torch.device

    def backward(self, name: str, loss: Tensor) -> None:
        """Backpropagate one micro-batch loss of network `name` (scaled for gradient accumulation)."""

    def step(self, name: str) -> dict:
        """Called after every micro-batch; applies the optimizer update at the accumulation boundary.
        Returns stats of the update when one was applied (e.g. {"grad_norm": ...}), else {}."""

    def frozen(self, name: str) -> contextlib.AbstractContextManager:
        """Context in which network `name` computes no weight gradients (input gradients still flow)."""

    def ema_update(self) -> None:
        """Update the generator's EMA after a generator update (no-op when EMA is off)."""

    def sampling_generator(self, ema: bool = True) -> nn.Module:
        """A module to sample from: the EMA weights when kept and asked for, else the live generator."""

    def save_state(self, directory: Path) -> None:
        """Write weights, optimizer states and EMA into `directory` (all ranks call this)."""

    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote."""

    def generator_state_dict(self, ema: bool = True) -> dict[str, Tensor]:
        """Consolidated generator weights on CPU (for export)."""

    def barrier(self) -> None: ...

    def all_reduce_mean(self, value: Tensor) -> Tensor: ...


@contextlib.contextmanager
def frozen_network(module: nn.Module, name: str = "", held: dict[str, list] | None = None):
    """Switch off `module`'s weight gradients for the block (input gradients still flow, §3).

    held None: each parameter's flag is restored when the block ends. Otherwise the flags stay off after it, kept in
    `held[name]` until `release_frozen(held)`: a network whose blocks are recomputed in the next backward
    (activation checkpointing) must recompute frozen, or the recomputation saves weights the frozen forward did not
    (and would compute their gradients)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        if held is None:
            for p, flag in flags:
                p.requires_grad_(flag)
        else:
            held.setdefault(name, flags)


def requires_grad_off(module: nn.Module):
    """Temporarily switch off weight gradients of `module`, restoring each parameter's flag afterwards."""
    return frozen_network(module)


def release_frozen(held: dict[str, list]) -> None:
    """Restore the weight-gradient flags kept by `frozen_until_backward` (after the backward)."""
    for flags in held.values():
        for p, flag in flags:
            p.requires_grad_(flag)
    held.clear()


class EMA:
    """fp32 exponential moving average of a module's parameters, decay min(decay, (1 + n) / (10 + n))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        named = list(module.named_parameters())
        # one multi-tensor lerp over all parameters (a kernel launch per parameter group, not per parameter)
        torch._foreach_lerp_([self.shadow[name] for name, _ in named], [p.detach().float() for _, p in named], 1 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))
