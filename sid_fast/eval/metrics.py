"""Metrics for real runs (DESIGN.md §8): Fréchet distance on features (`fd` on the samples themselves, FID with
Inception-v3 pool features), CLIP score and the ShapesWorld checker score, all distributed over ranks. Networks load
from local files only; nothing is downloaded.

Distribution: each rank accumulates sufficient statistics (count, Σf, Σ f fᵀ in float64 for Fréchet; Σ score and
count for CLIP; correct and count for ShapesWorld) over its own samples; `all_reduce` sums them over ranks, so the
result equals one process seeing every sample.

Every metric has `higher_is_better` (the direction best-checkpoint retention uses) and `uses_prompts` (whether
`update` takes the prompt texts: `update(images, prompts)` instead of `update(samples)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

HIGHER_IS_BETTER = {"fd": False, "fid": False, "clip": True, "shapes": True}
"""Direction of each `eval.metric`: Fréchet distances are better lower, CLIP and checker scores higher."""

FD_GRID = 4
"""Side of the average-pooling grid of `fd_features` for (C, H, W) samples."""


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


def fd_features(samples: Tensor) -> Tensor:
    """The features of the `fd` metric for any sample layout, in float64.

    Vectors (B, D) are their own features (the toy mixtures). Latents or images (B, C, H, W) are average-pooled per
    channel onto a FD_GRID × FD_GRID grid (adaptive pooling) and flattened: C·16 features (SD3/FLUX latents 256,
    SANA 512, ShapesWorld pixels 48). So `fd` compares channel means and covariances at a coarse layout: cheap, with
    a covariance estimable from a few hundred samples, and blind to fine detail (use `fid` or `shapes` for that).
    Reference files for `fd` must hold features made by this function (`write_reference`).
    """
    x = samples.detach().float()
    if x.ndim == 2:
        return x.double()
    if x.ndim == 4:
        return nn.functional.adaptive_avg_pool2d(x, FD_GRID).flatten(1).double()
    if x.ndim == 3:  # (B, L, D) token latents: mean over tokens
        return x.mean(1).double()
    raise ValueError(f"fd_features: samples must be (B, D), (B, L, D) or (B, C, H, W), got {tuple(x.shape)}")


def write_reference(features: Tensor, path: str | Path) -> Path:
    """Save (N, F) reference features as `mu` and `sigma` (float64) in a safetensors file for `eval.reference`."""
    from safetensors.torch import save_file

    stats = FeatureStats(features.shape[1])
    stats.update(features)
    mu, sigma = stats.mean_cov()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mu": mu.contiguous(), "sigma": sigma.contiguous()}, str(path))
    return path


def to_uint8_tensor(images: Tensor) -> Tensor:
    """(B, C, H, W) float in [-1, 1] (or already uint8) -> (B, 3, H, W) uint8; C = 1 repeated, C > 3 keeps 3."""
    if images.dtype != torch.uint8:
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images[:, :3]


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> Inception pool features (B, 2048): quantised to uint8 as a saved image
    would be, then the network of `load_inception` (which resizes to 299 itself)."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, images: Tensor) -> Tensor:
        return self.inception(to_uint8_tensor(images))


class FrechetMetric:
    """Distributed Fréchet distance of generated features against a reference (μ, Σ) (lower is better).

    feature_fn: (B, ...) samples -> (B, F) features (`InceptionFeatures` for FID; `fd_features` for `fd`).
    """

    higher_is_better = False
    uses_prompts = False

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


def _embedding(output) -> Tensor:
    """CLIPModel.get_*_features: a tensor (transformers 4) or an output whose pooler_output is the projection (5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipScore:
    """CLIP score 100·max(cos(image, text), 0) per sample, averaged over the samples of all ranks (higher is better).

    The convention of Hessel et al. 2021 (CLIPScore = w·max(cos, 0), clamped per sample) with torchmetrics' w = 100
    instead of the paper's 2.5. `model_dir`: a local transformers CLIP directory (CLIPModel + CLIPProcessor files).
    """

    higher_is_better = True
    uses_prompts = True

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
    def scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Per-sample 100·max(cos, 0), (B,) float; images: (B, 3, H, W) uint8 or float in [-1, 1]; prompts: B strings."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"ClipScore: {images.shape[0]} images but {len(prompts)} prompts")
        pixels = to_uint8_tensor(images).cpu().numpy().transpose(0, 2, 3, 1)
        inputs = self.processor(text=list(prompts), images=list(pixels), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))
        cosine = (nn.functional.normalize(image, dim=-1) * nn.functional.normalize(text, dim=-1)).sum(-1)
        return 100 * cosine.clamp_min(0)

    def update(self, images: Tensor, prompts: list[str]) -> None:
        """Accumulate the scores of images (B, 3, H, W) (uint8, or float in [-1, 1]) for their B prompts."""
        scores = self.scores(images, prompts)
        self.total += scores.double().sum().cpu()
        self.count += scores.shape[0]

    def compute(self) -> float:
        total, count = self.total.clone(), self.count.clone()
        _all_reduce_sum([total, count])
        self.total.zero_()
        self.count.zero_()
        return float(total / count)


class ShapesScore:
    """ShapesWorld: the exact checker's fraction of correct images for their captions (higher is better), summed
    over ranks; with a feature net also the Fréchet distance of its features against rendered truth
    (`details["fd"]`). `details` also holds the 95% Wilson interval of the score (`ci_low`, `ci_high`).

    truth: (μ, Σ) of the feature net's features on rendered ground truth of the same prompts (with `feature_net`).
    """

    higher_is_better = True
    uses_prompts = True

    def __init__(self, feature_net: nn.Module | None = None, truth: tuple[Tensor, Tensor] | None = None):
        if (feature_net is None) != (truth is None):
            raise ValueError("ShapesScore: give both feature_net and truth, or neither")
        self.feature_net, self.truth = feature_net, truth
        self.correct = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.stats: FeatureStats | None = None
        self.details: dict[str, float] = {}

    def update(self, images: Tensor, prompts: list[str]) -> None:
        """images: (B, 3, R, R) in [-1, 1] (clamped here); prompts: B captions of the ShapesWorld grammar."""
        from sid_fast.shapes.checker import check_batch

        images = images.detach().float().clamp(-1, 1).cpu()
        self.correct += float(check_batch(images, list(prompts)).sum())
        self.count += images.shape[0]
        if self.feature_net is not None:
            from sid_fast.shapes.features import features

            values = features(self.feature_net, images)
            if self.stats is None:
                self.stats = FeatureStats(values.shape[1])
            self.stats.update(values)

    def compute(self) -> float:
        from sid_fast.shapes.checker import wilson_interval

        correct, count = self.correct.clone(), self.count.clone()
        _all_reduce_sum([correct, count])
        self.correct.zero_()
        self.count.zero_()
        low, high = wilson_interval(int(round(float(correct))), int(count))
        self.details = {"ci_low": low, "ci_high": high}
        if self.feature_net is not None:
            if self.stats is None:
                raise ValueError("ShapesScore.compute before any update")
            self.details["fd"] = frechet_distance(*self.stats.all_reduce().mean_cov(), *self.truth)
            self.stats = None
        return float(correct / count)


def to_uint8_images(samples: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] (decoded images) -> (B, H, W, 3) uint8; C = 1 is repeated, C > 3 keeps the first 3."""
    x = samples.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x[:, :3]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
