"""Scores of samples against an exact Gaussian mixture: energy distance over its noise floor, mode
coverage and weights, mean log-likelihood."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sid_fast.eval.distances import energy_distance, energy_noise_floor, mode_weights


@dataclass
class MixtureScore:
    energy: float
    """Energy distance to fresh true samples of the same size."""
    floor: float
    """Energy distance between two independent true sample sets of that size (the noise floor)."""
    ratio: float
    """energy / floor: 1 is indistinguishable from the truth at this sample size."""
    modes_covered: int
    """Modes holding at least a quarter of their true weight."""
    max_weight_error: float
    """Largest |sample fraction - true weight| over modes."""
    mean_log_likelihood: float
    """Mean log p(x) under the exact (conditional) mixture."""

    def as_dict(self) -> dict:
        return asdict(self)


def score_samples(samples: torch.Tensor, mixture, labels: torch.Tensor | None = None, floor: float | None = None,
                  seed: int = 12345) -> MixtureScore:
    """Score (n, d) samples drawn for per-sample `labels` (None / -1: the marginal)."""
    n = samples.shape[0]
    rng = torch.Generator().manual_seed(seed)
    truth = mixture.sample(n, labels, generator=rng)
    if floor is None:
        floor = energy_noise_floor(lambda k: mixture.sample(k, labels, generator=rng), n, repeats=3)
    energy = energy_distance(samples, truth)
    weights = mode_weights(samples, mixture.means)
    true_weights = mixture.component_weights(labels, n).mean(0)
    covered = int(((weights >= 0.25 * true_weights) & (true_weights > 0)).sum())
    return MixtureScore(
        energy=energy,
        floor=floor,
        ratio=energy / floor,
        modes_covered=covered,
        max_weight_error=float((weights - true_weights).abs().max()),
        mean_log_likelihood=float(mixture.log_prob(samples, labels).mean()),
    )
