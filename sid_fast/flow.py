"""Flow-matching conventions shared by every teacher (DESIGN.md §1).

Time t in [0, 1], t = 1 is pure noise; x_t = (1 - t) x0 + t eps; every model predicts the velocity
v = eps - x0. All functions take a per-sample time of shape (B,) and broadcast it over the remaining
dimensions of the sample tensor, so they work for (B, d) vectors, (B, C, H, W) latents and FLUX's
packed (B, N, 64) tokens alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "expand_time",
    "interpolate",
    "velocity_to_x0",
    "velocity_to_noise",
    "velocity_to_score",
    "x0_to_velocity",
    "x0_noise_to_velocity",
    "TIME_SCHEMES",
    "sample_time",
    "shift_time",
]


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample time (B,) to (B, 1, ..., 1) so it broadcasts against `like`."""
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"time must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# §1: x_t = (1 - t) x0 + t eps
def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    tb = expand_time(t, x0)
    return (1 - tb) * x0 + tb * noise


# §1: D = x_t - t v
def velocity_to_x0(x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    return x_t - expand_time(t, x_t) * velocity


# §1: eps_hat = x_t + (1 - t) v
def velocity_to_noise(x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    return x_t + (1 - expand_time(t, x_t)) * velocity


# §1: grad log p_t = -eps_hat / t
def velocity_to_score(x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    return -velocity_to_noise(x_t, t, velocity) / expand_time(t, x_t)


# inverse of velocity_to_x0: v = (x_t - D) / t
def x0_to_velocity(x_t: Tensor, t: Tensor, x0_pred: Tensor) -> Tensor:
    return (x_t - x0_pred) / expand_time(t, x_t)


# the regression target of flow matching: v = eps - x0
def x0_noise_to_velocity(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


TIME_SCHEMES = ("logit_normal", "uniform", "shifted")


# Resolution shift used by SD3/FLUX schedulers: sigma = s t / (1 + (s - 1) t). s = 1 is the identity.
def shift_time(t: Tensor, shift: float) -> Tensor:
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_time(
    batch_size: int,
    scheme: str = "logit_normal",
    *,
    mean: float = math.log(2.0),
    std: float = 1.6,
    shift: float = 1.0,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw one training time per sample (§3).

    `logit_normal`: t = sigmoid(u), u ~ N(mean, std^2) (default mean ln 2, std 1.6).
    `uniform`: t ~ U(0, 1). `shifted`: uniform t passed through `shift_time(., shift)`.
    The result is clamped to [t_min, t_max] so that 1/t weightings stay finite.
    """
    if scheme == "logit_normal":
        u = torch.randn(batch_size, generator=generator, device=device) * std + mean
        t = torch.sigmoid(u)
    elif scheme == "uniform":
        t = torch.rand(batch_size, generator=generator, device=device)
    elif scheme == "shifted":
        t = shift_time(torch.rand(batch_size, generator=generator, device=device), shift)
    else:
        raise ValueError(f"unknown time scheme {scheme!r}; expected one of {TIME_SCHEMES}")
    return t.clamp(t_min, t_max)
