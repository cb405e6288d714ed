"""Sample-based distances used to check distilled generators against a known distribution."""

from __future__ import annotations

import torch
from torch import Tensor


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic, so it is > 0 for finite samples).

    x: (n, d), y: (m, d). Computed in float64.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)


def energy_noise_floor(sampler, n: int, repeats: int = 3) -> float:
    """Mean energy distance between independent true sample sets of size n: the floor any generator meets.

    sampler(n) -> (n, d) fresh true samples.
    """
    return sum(energy_distance(sampler(n), sampler(n)) for _ in range(repeats)) / repeats


def mode_assignment(samples: Tensor, means: Tensor) -> Tensor:
    """Index of the nearest mixture mean for each sample, (n,)."""
    return torch.cdist(samples.flatten(1).double(), means.double()).argmin(dim=1)


def mode_weights(samples: Tensor, means: Tensor) -> Tensor:
    """Fraction of samples nearest to each mode, (K,)."""
    assignment = mode_assignment(samples, means)
    return torch.bincount(assignment, minlength=means.shape[0]).double() / samples.shape[0]
