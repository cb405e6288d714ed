"""The SiD losses (DESIGN.md §3) as plain PyTorch reference functions.

These are the specification the fused kernels (`sid_fast.kernels`) must match. All arithmetic is fp32
whatever the input dtype; every loss is returned per sample, shape (B,): sum over latent elements,
the caller takes the mean over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sid_fast.flow import expand_time

WEIGHTINGS = ("one_minus_t", "one_minus_t_sq", "inv_t", "inv_t_sq", "snr", "sid")


def _per_sample_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)


@torch.no_grad()
def loss_weight(name: str, t: Tensor, x_g: Tensor | None = None, x0_teacher: Tensor | None = None) -> Tensor:
    """λ(t) of §3, shape (B,), computed without gradient.

    one_minus_t (default) 1 - t; one_minus_t_sq (1 - t)^2; inv_t 1/t; inv_t_sq 1/t^2;
    snr (1 - t)^2 / t^2; sid the original SiD normaliser 1 / mean|x_g - y_r| per sample
    (needs `x_g` and the teacher's x0-prediction `x0_teacher`).
    """
    t = t.float()
    if name == "one_minus_t":
        return 1 - t
    if name == "one_minus_t_sq":
        return (1 - t) ** 2
    if name == "inv_t":
        return 1 / t
    if name == "inv_t_sq":
        return 1 / t**2
    if name == "snr":
        return (1 - t) ** 2 / t**2
    if name == "sid":
        if x_g is None or x0_teacher is None:
            raise ValueError("weighting 'sid' needs x_g and the teacher's x0-prediction")
        return 1 / (x_g.float() - x0_teacher.float()).abs().flatten(1).mean(dim=1).clamp_min(1e-12)
    raise ValueError(f"unknown weighting {name!r}; expected one of {WEIGHTINGS}")


# §3 fake-score loss: sum over elements of ||v_psi - (eps - x_g)||^2, per sample
def fake_score_loss(velocity_fake: Tensor, x_g: Tensor, noise: Tensor) -> Tensor:
    target = noise.float() - x_g.float()
    return _per_sample_sum((velocity_fake.float() - target) ** 2)


# §3 generator loss: s * sum_elements λ(t) (y_r - y_f) · [(y_r - x_g) - α (y_r - y_f)], per sample,
# with y = x_t - t v the x0-predictions of the teacher (y_r) and the fake score (y_f).
def sid_generator_loss(
    x_t: Tensor,
    t: Tensor,
    x_g: Tensor,
    velocity_teacher: Tensor,
    velocity_fake: Tensor,
    weight: Tensor,
    alpha: float = 1.0,
    scale: float = 100.0,
) -> Tensor:
    x_t, x_g = x_t.float(), x_g.float()
    tb = expand_time(t.float(), x_t)
    x0_teacher = x_t - tb * velocity_teacher.float()
    x0_fake = x_t - tb * velocity_fake.float()
    diff = x0_teacher - x0_fake
    per_element = diff * ((x0_teacher - x_g) - alpha * diff)
    return scale * weight.float() * _per_sample_sum(per_element)


def cfg_fake_score_loss(velocity_uncond: Tensor, velocity_cond: Tensor, scale: float, x_g: Tensor, noise: Tensor) -> Tensor:
    """Fake-score loss on the CFG combination at κ1 (the op the fused kernel implements)."""
    velocity = velocity_uncond.float() + scale * (velocity_cond.float() - velocity_uncond.float())
    return fake_score_loss(velocity, x_g, noise)


def cfg_sid_generator_loss(
    x_t: Tensor,
    t: Tensor,
    x_g: Tensor,
    teacher_uncond: Tensor,
    teacher_cond: Tensor,
    fake_uncond: Tensor,
    fake_cond: Tensor,
    teacher_scale: float,
    fake_scale: float,
    weight: Tensor,
    alpha: float = 1.0,
    scale: float = 100.0,
) -> Tensor:
    """Generator loss with both CFG combinations (κ4 for the teacher, κ2 for the fake score) folded in."""
    velocity_teacher = teacher_uncond.float() + teacher_scale * (teacher_cond.float() - teacher_uncond.float())
    velocity_fake = fake_uncond.float() + fake_scale * (fake_cond.float() - fake_uncond.float())
    return sid_generator_loss(x_t, t, x_g, velocity_teacher, velocity_fake, weight, alpha, scale)
