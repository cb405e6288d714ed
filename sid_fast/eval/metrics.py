"""Metrics for real runs (DESIGN.md §8): Fréchet distance on features (FID with Inception-v3 pool features) and
CLIP score, both distributed over ranks. Networks load from local files only; nothing is downloaded.

Distribution: each rank accumulates sufficient statistics (count, Σf, Σ f fᵀ in float64 for Fréchet; Σ score and
count for CLIP) over its own samples; `all_reduce` sums them over ranks, so the result equals one process seeing
every sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


def _all_reduce_sum(tensors: list[Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)


class FeatureStats:
    """Running count, sum and sum of outer products of (N, F) features (float64); mean and covariance."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise FloatingPointError(f"non-finite features ({int((~torch.isfinite(features)).sum())} values)")
        f = features.detach().double().cpu()
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics over all ranks (in place); a no-op without torch.distributed."""
        _all_reduce_sum([self.count, self.total, self.outer])
        return self

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """(F,) mean and (F, F) unbiased covariance."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {int(n)}")
        mean = self.total / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov


# Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2): ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})  (Heusel et al. 2017)
def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """float64; tr((Σ1 Σ2)^{1/2}) from the eigenvalues of Σ1 Σ2 (real, ≥ 0 for PSD inputs; rounding clipped at 0)."""
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma {tuple(sigma1.shape)}/{tuple(sigma2.shape)}")
    eigenvalues = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp_min(0)
    trace_sqrt = eigenvalues.sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(value)


def frechet_distance_of(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between two (N, F) feature sets (single process)."""
    a, b = FeatureStats(features_a.shape[1]), FeatureStats(features_b.shape[1])
    a.update(features_a)
    b.update(features_b)
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def load_reference(path: str | Path) -> tuple[Tensor, Tensor]:
    """(μ, Σ) from a safetensors file with `mu` and `sigma`, or with raw `features` (N, F)."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    if "mu" in data and "sigma" in data:
        return data["mu"].double(), data["sigma"].double()
    if "features" in data:
        stats = FeatureStats(data["features"].shape[1])
        stats.update(data["features"])
        return stats.mean_cov()
    raise ValueError(f"{path}: expected tensors `mu` and `sigma`, or `features` (N, F); found {sorted(data)}")


def load_inception(weights: str | Path) -> nn.Module:
    """Inception-v3 pool-feature extractor from a local file: images (B, 3, H, W) uint8 -> (B, 2048).

    TorchScript (e.g. NVlabs' pt_inception-2015-12-05, called with return_features=True) loads with torch.jit;
    a state dict (torch-fidelity's pt_inception-2015-12-05-6726825d.pth) loads through torchmetrics, which needs
    the `torch-fidelity` package.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"config field eval.inception_weights: {weights} does not exist")
    try:
        scripted = torch.jit.load(str(weights), map_location="cpu").eval()
    except RuntimeError:
        scripted = None
    if scripted is not None:
        class _Scripted(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = scripted

            def forward(self, images: Tensor) -> Tensor:
                return self.net(images, return_features=True)

        return _Scripted()
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"{weights} is not TorchScript; a state-dict Inception needs torch-fidelity ({error})") from None
    return metric.inception.eval()


class FrechetMetric:
    """Distributed Fréchet distance of generated features against a reference (μ, Σ).

    feature_fn: (B, ...) samples -> (B, F) features (Inception for FID; identity flatten for the toy `fd`).
    """

    def __init__(self, feature_fn, reference: tuple[Tensor, Tensor]):
        self.feature_fn, self.reference = feature_fn, reference
        self.stats: FeatureStats | None = None

    def update(self, samples: Tensor) -> None:
        with torch.no_grad():
            features = self.feature_fn(samples)
        if self.stats is None:
            self.stats = FeatureStats(features.shape[1])
        self.stats.update(features)

    def compute(self) -> float:
        if self.stats is None:
            raise ValueError("FrechetMetric.compute before any update")
        value = frechet_distance(*self.stats.all_reduce().mean_cov(), *self.reference)
        self.stats = None
        return value


class ClipScore:
    """CLIP score 100·max(cos(image, text), 0), averaged over samples of all ranks; a local transformers CLIP directory."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"config field eval.clip_model: {model_dir} has no config.json (a CLIP model directory)")
        self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
        self.device = device
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, images: Tensor, prompts: list[str]) -> None:
        """images: (B, 3, H, W) uint8; prompts: B strings."""
        inputs = self.processor(text=prompts, images=list(images.cpu().numpy().transpose(0, 2, 3, 1)), return_tensors="pt",
                                padding=True, truncation=True).to(self.device)
        image = nn.functional.normalize(self.model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        text = nn.functional.normalize(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                                    attention_mask=inputs["attention_mask"]), dim=-1)
        scores = 100 * (image * text).sum(-1).clamp_min(0)
        self.total += scores.double().sum().cpu()
        self.count += scores.shape[0]

    def compute(self) -> float:
        total, count = self.total.clone(), self.count.clone()
        _all_reduce_sum([total, count])
        self.total.zero_()
        self.count.zero_()
        return float(total / count)


def to_uint8_images(samples: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] (decoded images) -> (B, H, W, 3) uint8; C = 1 is repeated, C > 3 keeps the first 3."""
    x = samples.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x[:, :3]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
