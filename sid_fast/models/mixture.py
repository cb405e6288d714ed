"""The exact toy teacher of DESIGN.md §9: a Gaussian mixture whose flow-matching velocity is known in closed form.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I). Along x_t = (1 - t) x0 + t eps the marginal is a mixture too:
x_t | k ~ N((1 - t) mu_k, c_k I) with c_k = (1 - t)^2 s_k^2 + t^2. A class-conditional teacher uses per-class
weights over the same components; label -1 (the "empty prompt") uses the marginal weights.
Samples may have any shape (B, ...); they are flattened to (B, d) internally.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sid_fast.flow import expand_time
from sid_fast.models.protocol import Conditioning


class GaussianMixture(nn.Module):
    """Isotropic Gaussian mixture with optional class-conditional component weights.

    means: (K, d); stds: (K,); weights: (K,) marginal weights; class_weights: (C, K) rows = p(k | class).
    When class_weights is given and weights is None, the marginal is the uniform average of the classes.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None, class_weights: Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0]).clone()
        if means.ndim != 2:
            raise ValueError(f"means must be (K, d), got {tuple(means.shape)}")
        if (stds <= 0).any():
            raise ValueError("mixture stds must be positive")
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float64)
            if class_weights.shape[1] != means.shape[0]:
                raise ValueError(f"class_weights must be (C, {means.shape[0]}), got {tuple(class_weights.shape)}")
            class_weights = class_weights / class_weights.sum(dim=1, keepdim=True)
            if weights is None:
                weights = class_weights.mean(dim=0)
        if weights is None:
            weights = torch.full((means.shape[0],), 1.0 / means.shape[0], dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("class_weights", class_weights if class_weights is not None else weights[None].clone())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return self.class_weights.shape[0]

    def component_weights(self, labels: Tensor | None, batch: int) -> Tensor:
        """(B, K) mixture weights per sample: class rows for labels >= 0, the marginal for -1 / None."""
        if labels is None:
            return self.weights.expand(batch, -1)
        labels = labels.long()
        if labels.max() >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} out of range for {self.num_classes} classes")
        rows = self.class_weights[labels.clamp_min(0)]
        return torch.where((labels < 0)[:, None], self.weights.expand(batch, -1), rows)

    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """(n, d) float32 samples; per-sample class `labels` (or the marginal)."""
        weights = self.component_weights(labels, n)
        component = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[component] + self.stds[component, None] * noise).float()

    def log_prob(self, x: Tensor, labels: Tensor | None = None, t: float = 0.0) -> Tensor:
        """log p_t(x) (per sample) of the noisy marginal at time t (t = 0: the data density)."""
        x = x.flatten(1).double()
        c = (1 - t) ** 2 * self.stds**2 + t**2  # (K,)
        sq = ((x[:, None, :] - (1 - t) * self.means[None]) ** 2).sum(-1)  # (B, K)
        log_normal = -0.5 * sq / c - 0.5 * self.dim * torch.log(2 * math.pi * c)
        log_w = torch.log(self.component_weights(labels, x.shape[0]).clamp_min(1e-300))
        return torch.logsumexp(log_w + log_normal, dim=1)

    # §9: exact velocity v(x_t, t) = sum_k r_k (E[eps | x_t, k] - E[x0 | x_t, k])
    def velocity(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        shape, dtype = x_t.shape, x_t.dtype
        x = x_t.flatten(1).double()
        tb = expand_time(t.double(), x)  # (B, 1)
        one_minus = 1 - tb
        var = one_minus[:, :, None] ** 2 * self.stds[None, :, None] ** 2 + tb[:, :, None] ** 2  # (B, K, 1)
        centred = x[:, None, :] - one_minus[:, :, None] * self.means[None]  # (B, K, d)
        log_normal = -0.5 * (centred**2).sum(-1) / var[..., 0] - 0.5 * self.dim * torch.log(var[..., 0])
        log_w = torch.log(self.component_weights(labels, x.shape[0]).clamp_min(1e-300))
        resp = torch.softmax(log_w + log_normal, dim=1)  # (B, K)
        x0_k = self.means[None] + one_minus[:, :, None] * self.stds[None, :, None] ** 2 / var * centred
        eps_k = (x[:, None, :] - one_minus[:, :, None] * x0_k) / tb[:, :, None]
        velocity = (resp[..., None] * (eps_k - x0_k)).sum(1)
        return velocity.to(dtype).reshape(shape)


class MixtureTeacher(nn.Module):
    """The exact mixture as a velocity model (the §9 teacher). Conditioning: `labels` (-1 = unconditional)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.mixture.velocity(x_t, t, cond.labels)


def ring_mixture(num_modes: int = 8, radius: float = 2.0, std: float = 0.1, num_classes: int | None = None) -> GaussianMixture:
    """Modes evenly spaced on a circle in 2-D. With `num_classes` C, class c owns modes k with k % C == c."""
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    class_weights = None
    if num_classes is not None:
        class_weights = torch.zeros(num_classes, num_modes, dtype=torch.float64)
        for k in range(num_modes):
            class_weights[k % num_classes, k] = 1.0
    return GaussianMixture(means, torch.full((num_modes,), std), class_weights=class_weights)


def random_mixture(num_modes: int, dim: int, num_classes: int | None = None, seed: int = 0, spread: float = 2.0, std: float = 0.3) -> GaussianMixture:
    """Random means in `dim` dimensions; class c owns components k % C == c (with random weights)."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(num_modes, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(num_modes, generator=g, dtype=torch.float64)
    class_weights = None
    if num_classes is not None:
        class_weights = torch.zeros(num_classes, num_modes, dtype=torch.float64)
        for k in range(num_modes):
            class_weights[k % num_classes, k] = weights[k]
        weights = None
    return GaussianMixture(means, torch.full((num_modes,), std), weights=weights, class_weights=class_weights)


class LabelConditions:
    """Condition source for class-conditional toy teachers: labels drawn from `class_probs`.

    With `num_classes` = 0 every sample is unconditional (label -1). Stateless apart from the trainer's RNG.
    """

    def __init__(self, num_classes: int = 0, class_probs: Tensor | None = None):
        self.num_classes = num_classes
        if num_classes > 0:
            probs = torch.full((num_classes,), 1.0 / num_classes) if class_probs is None else torch.as_tensor(class_probs, dtype=torch.float32)
            self.class_probs = probs / probs.sum()

    def sample(self, batch_size: int, generator: torch.Generator) -> Conditioning:
        if self.num_classes == 0:
            return self.unconditional(batch_size)
        labels = torch.multinomial(self.class_probs.to(generator.device), batch_size, replacement=True, generator=generator)
        return Conditioning(labels=labels)

    def unconditional(self, batch_size: int) -> Conditioning:
        return Conditioning(labels=torch.full((batch_size,), -1, dtype=torch.long))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class MixtureRealData:
    """Real samples from an exact mixture (§9) with their labels: the toy stand-in for image shards.

    `sample_with_latents(batch)` -> (x0 (B, d), Conditioning(labels)), as `ShardConditions` gives for images.
    """

    def __init__(self, mixture, conditions, seed: int = 0):
        self.mixture, self.conditions = mixture, conditions
        self.rng = torch.Generator().manual_seed(seed)

    def sample_with_latents(self, batch_size: int) -> tuple[Tensor, Conditioning]:
        cond = self.conditions.sample(batch_size, self.rng)
        return self.mixture.sample(batch_size, cond.labels, generator=self.rng).float(), cond

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.rng.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
