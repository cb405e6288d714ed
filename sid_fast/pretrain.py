"""Flow-matching pretraining of a velocity model: how toy teachers and generator initialisations are made.

Minimises E ||v(x_t, t, c) - (eps - x0)||^2 with x_t = (1 - t) x0 + t eps (§1) and caption/label dropout
so the model also learns the unconditional velocity used by CFG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sid_fast.flow import interpolate, sample_time, x0_noise_to_velocity
from sid_fast.models.protocol import Conditioning


def drop_conditions(cond: Conditioning, null: Conditioning, drop: torch.Tensor) -> Conditioning:
    """Replace the samples where `drop` (B,) bool is set by the unconditional `null` (batch B): caption dropout."""
    return Conditioning(**{
        name: torch.where(drop.view(-1, *([1] * (value.ndim - 1))), getattr(null, name).to(value.dtype), value)
        for name, value in cond.tensors().items()
    })


# §1: E ||v(x_t, t, c) - (eps - x0)||^2, x_t = (1 - t) x0 + t eps; summed over elements, mean over the batch
def flow_matching_loss(model: nn.Module, x0: torch.Tensor, cond: Conditioning, null: Conditioning,
                       rng: torch.Generator, cond_dropout: float = 0.1, time_scheme: str = "logit_normal",
                       **time_options) -> torch.Tensor:
    """One flow-matching loss on data x0 (B, ...) with conditions `cond`; a `cond_dropout` fraction of the batch
    gets the unconditional `null` (batch B) so the model also learns the CFG branch. Draws from `rng` in a fixed
    order: dropout, noise, time."""
    batch_size, device = x0.shape[0], x0.device
    if cond_dropout > 0:  # drawn on the CPU generator (the stream is the same on every device), then moved
        cond = drop_conditions(cond, null, (torch.rand(batch_size, generator=rng) < cond_dropout).to(device))
    noise = torch.randn(x0.shape, generator=rng).to(device)
    t = sample_time(batch_size, time_scheme, generator=rng, **time_options).to(device)
    prediction = model(interpolate(x0, noise, t), t, cond)
    return ((prediction.float() - x0_noise_to_velocity(x0, noise).float()) ** 2).flatten(1).sum(1).mean()


def fit_flow_matching(
    model: nn.Module,
    sample_data: Callable[[int, torch.Generator], tuple[torch.Tensor, Conditioning]],
    uncond: Callable[[int], Conditioning],
    steps: int,
    *,
    batch_size: int = 256,
    lr: float = 1e-3,
    cond_dropout: float = 0.1,
    time_scheme: str = "logit_normal",
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train `model` in place; `sample_data(batch, rng)` returns (x0, cond). Returns the loss curve."""
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="flow matching", leave=False)
    model.train()
    for _ in iterator:
        x0, cond = sample_data(batch_size, rng)
        loss = flow_matching_loss(model, x0, cond, uncond(batch_size), rng, cond_dropout, time_scheme)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
