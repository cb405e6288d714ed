"""Fréchet distance and its distributed statistics (sid_fast.eval.metrics) against a direct NumPy/SciPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from sid_fast.eval.metrics import FeatureStats, FrechetMetric, frechet_distance, frechet_distance_of, load_inception


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_identical_sets_give_zero():
    features = torch.randn(200, 13, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance_of(features, features.clone())) < 1e-8


def test_matches_scipy_on_random_features():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 11, generator=g)
    b = 0.7 * torch.randn(250, 11, generator=g) @ torch.randn(11, 11, generator=g) * 0.4 + 0.3
    ours = frechet_distance_of(a, b)
    reference = scipy_frechet(a.double().numpy(), b.double().numpy())
    assert reference > 1.0  # a real difference, not a trivial zero
    assert ours == pytest.approx(reference, rel=1e-6)


def test_split_statistics_equal_one_pass_and_tiny_network_features():
    """The per-rank statistics summed (what all_reduce does) equal one pass; a tiny random 'Inception'."""
    torch.manual_seed(2)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images, reference_images = torch.randn(40, 3, 8, 8), torch.randn(40, 3, 8, 8) + 0.5
    with torch.no_grad():
        reference_features = network(reference_images)
    ref = FeatureStats(4)
    ref.update(reference_features)
    metric = FrechetMetric(network, ref.mean_cov())
    metric.update(images[:20])
    metric.update(images[20:])  # two "ranks" worth of samples
    with torch.no_grad():
        direct = scipy_frechet(network(images).double().numpy(), reference_features.double().numpy())
    assert metric.compute() == pytest.approx(direct, rel=1e-6)
    self_metric = FrechetMetric(network, ref.mean_cov())
    self_metric.update(reference_images)
    assert abs(self_metric.compute()) < 1e-8


def test_bad_inputs_name_the_problem(tmp_path):
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        stats.update(torch.randn(4, 2))
    with pytest.raises(FloatingPointError, match="non-finite"):
        stats.update(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        load_inception(tmp_path / "missing.pt")


def test_torchscript_inception_file_is_accepted(tmp_path):
    class Fake(nn.Module):
        def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return images.float().mean(dim=(2, 3)) if return_features else images

    path = tmp_path / "inception.pt"
    torch.jit.script(Fake()).save(str(path))
    extractor = load_inception(path)
    images = torch.randint(0, 255, (2, 3, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(extractor(images), images.float().mean(dim=(2, 3)))
