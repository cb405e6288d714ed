"""Samplers: the K-step SiD generator sampler (DESIGN.md §2) and a plain Euler ODE sampler for teachers."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from sid_fast.flow import expand_time, shift_time, velocity_to_noise, velocity_to_x0
from sid_fast.guidance import guided_velocity
from sid_fast.models.protocol import Conditioning

NOISE_MODES = ("fresh", "fixed", "ddim")


def generator_step_times(num_steps: int, t_init: float = 1.0) -> list[float]:
    """§2: t_k = t_init (1 - k / K), k = 0..K-1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [t_init * (1 - k / num_steps) for k in range(num_steps)]


def few_step_sample(
    generator_model,
    z: Tensor,
    cond: Conditioning,
    num_steps: int = 4,
    *,
    steps_to_run: int | None = None,
    t_init: float = 1.0,
    noise: str = "fresh",
    rng: torch.Generator | None = None,
    grad_last: bool = False,
) -> Tensor:
    """Run the K-step generator sampler of §2 and return its x0 output D_{K'-1}.

    z: (B, ...) initial noise. `steps_to_run` = K' <= K runs only the first K' steps of the K grid
    (training with random K'). With `grad_last`, only the last generator call carries gradient and its
    input is detached; every earlier call runs under no_grad. Noise n_k: `fresh` (n_0 = z, then new draws
    from `rng`), `fixed` (always z), `ddim` (the previous step's eps-prediction, detached).
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"unknown noise mode {noise!r}; expected one of {NOISE_MODES}")
    times = generator_step_times(num_steps, t_init)
    steps_to_run = num_steps if steps_to_run is None else steps_to_run
    if not 1 <= steps_to_run <= num_steps:
        raise ValueError(f"steps_to_run must be in [1, {num_steps}], got {steps_to_run}")
    x0_pred = torch.zeros_like(z)
    step_noise = z
    for k in range(steps_to_run):
        t_k = times[k]
        if k > 0 and noise == "fresh":
            step_noise = torch.randn(z.shape, generator=rng, device=z.device, dtype=z.dtype)
        t = torch.full((z.shape[0],), t_k, device=z.device, dtype=torch.float32)
        # §2: x_{t_k} = (1 - t_k) D_{k-1} + t_k n_k
        x_t = ((1 - t_k) * x0_pred + t_k * step_noise).detach()
        last = k == steps_to_run - 1
        context = contextlib.nullcontext() if (grad_last and last) else torch.no_grad()
        with context:
            velocity = generator_model(x_t, t, cond)
            # §2: D_k = x_{t_k} - t_k G(x_{t_k}, t_k, c)
            x0_pred = velocity_to_x0(x_t, t, velocity)
        if noise == "ddim" and not last:
            step_noise = velocity_to_noise(x_t, t, velocity).detach()
    return x0_pred


def euler_times(num_steps: int, shift: float = 1.0, sigmas: Tensor | None = None) -> Tensor:
    """Decreasing times from 1 to 0 (length num_steps + 1), optionally shifted; or explicit `sigmas`."""
    if sigmas is not None:
        times = torch.as_tensor(sigmas, dtype=torch.float64)
        if times[-1] != 0:
            times = torch.cat([times, times.new_zeros(1)])
        return times
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


@torch.no_grad()
def euler_sample(
    model,
    z: Tensor,
    cond: Conditioning,
    num_steps: int = 28,
    *,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    sigmas: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrate the teacher's probability-flow ODE dx/dt = v from t = 1 (z) to t = 0 with Euler steps.

    With `guidance_scale` != 1, `uncond` is required and the velocity is CFG-combined (§4).
    `sigmas` overrides the time grid (e.g. a diffusers scheduler's `sigmas`, for like-for-like checks).
    """
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs the unconditional conditioning `uncond`")
    times = euler_times(num_steps, shift, sigmas)
    x = z
    steps = range(len(times) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="euler", leave=False)
    for i in steps:
        t_cur, t_next = float(times[i]), float(times[i + 1])
        t = torch.full((z.shape[0],), t_cur, device=z.device, dtype=torch.float32)
        if guidance_scale == 1.0:
            velocity = model(x, t, cond)
        else:
            velocity = guided_velocity(model, x, t, cond, uncond, guidance_scale)
        x = x + (t_next - t_cur) * velocity.to(x.dtype)
    return x


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps (re-exported for samplers' users)."""
    tb = expand_time(t, x0)
    return (1 - tb) * x0 + tb * noise
