import pytest
import torch
from torch import nn

from sid_fast.models import Conditioning
from sid_fast.sampler import euler_sample, euler_times, few_step_sample, generator_step_times


class Recorder(nn.Module):
    """Velocity model that records its inputs and returns a fixed linear map of x_t (with a parameter)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x_t, t, cond):
        self.calls.append((x_t.detach().clone(), t.clone(), torch.is_grad_enabled(), x_t.requires_grad))
        return self.scale * x_t


COND = Conditioning(labels=torch.full((3,), -1))


def test_step_times():
    assert generator_step_times(4) == [1.0, 0.75, 0.5, 0.25]
    assert generator_step_times(1) == [1.0]
    with pytest.raises(ValueError):
        generator_step_times(0)


def test_one_step_is_z_minus_g():
    model, z = Recorder(), torch.randn(3, 2)
    out = few_step_sample(model, z, COND, 1)
    torch.testing.assert_close(out, z - 0.5 * z)


@pytest.mark.parametrize("noise", ["fresh", "fixed", "ddim"])
def test_multi_step_chain_follows_section_2(noise):
    model, z = Recorder(), torch.randn(3, 2)
    rng = torch.Generator().manual_seed(0)
    out = few_step_sample(model, z, COND, 4, noise=noise, rng=rng)
    replay = torch.Generator().manual_seed(0)
    x0, n = torch.zeros_like(z), z
    for k, t_k in enumerate([1.0, 0.75, 0.5, 0.25]):
        if k > 0 and noise == "fresh":
            n = torch.randn(z.shape, generator=replay)
        x_t = (1 - t_k) * x0 + t_k * n
        torch.testing.assert_close(model.calls[k][0], x_t)
        v = 0.5 * x_t
        x0 = x_t - t_k * v
        if noise == "ddim":
            n = x_t + (1 - t_k) * v
    torch.testing.assert_close(out, x0.detach())


def test_gradient_only_through_last_call():
    model, z = Recorder(), torch.randn(3, 2)
    out = few_step_sample(model, z, COND, 4, steps_to_run=3, grad_last=True, rng=torch.Generator().manual_seed(0))
    assert len(model.calls) == 3
    assert [c[2] for c in model.calls] == [False, False, True]
    assert not model.calls[-1][3]  # the last call's input is detached
    out.sum().backward()
    # d out / d scale with a detached input = -t_last * sum(x_t) of the last call only
    x_last, t_last = model.calls[-1][0], model.calls[-1][1][0]
    torch.testing.assert_close(model.scale.grad, -(t_last * x_last).sum())


def test_steps_to_run_bounds():
    with pytest.raises(ValueError, match="steps_to_run"):
        few_step_sample(Recorder(), torch.randn(3, 2), COND, 2, steps_to_run=3)
    with pytest.raises(ValueError, match="noise mode"):
        few_step_sample(Recorder(), torch.randn(3, 2), COND, 2, noise="pink")


def test_euler_linear_field_and_guidance_requirements():
    # v = x  =>  dx/dt = x, integrated from 1 to 0 with N Euler steps: x * (1 - 1/N)^N
    model, z = Recorder(), torch.randn(3, 2)
    with torch.no_grad():
        model.scale.fill_(1.0)
    out = euler_sample(model, z, COND, 10)
    torch.testing.assert_close(out, z * (1 - 1 / 10) ** 10)
    with pytest.raises(ValueError, match="uncond"):
        euler_sample(model, z, COND, 4, guidance_scale=2.0)
    times = euler_times(4, sigmas=torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64))
    assert times.tolist() == [1.0, 0.5, 0.2, 0.0]
