import math

import pytest
import torch

from sid_fast import flow


@pytest.mark.parametrize("shape", [(5, 2), (3, 4, 7, 7), (2, 13, 64)])
def test_conversions_round_trip(shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = flow.interpolate(x0, noise, t)
    velocity = flow.x0_noise_to_velocity(x0, noise)
    torch.testing.assert_close(flow.velocity_to_x0(x_t, t, velocity), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow.velocity_to_noise(x_t, t, velocity), noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow.x0_to_velocity(x_t, t, x0), velocity, rtol=1e-10, atol=1e-10)
    tb = flow.expand_time(t, x_t)
    torch.testing.assert_close(flow.velocity_to_score(x_t, t, velocity), -noise / tb)


def test_score_difference_identity():
    # §1: two scores differ by (1 - t) / t^2 times the difference of their x0-predictions
    g = torch.Generator().manual_seed(1)
    x_t, v1, v2 = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    lhs = flow.velocity_to_score(x_t, t, v1) - flow.velocity_to_score(x_t, t, v2)
    tb = flow.expand_time(t, x_t)
    rhs = (1 - tb) / tb**2 * (flow.velocity_to_x0(x_t, t, v1) - flow.velocity_to_x0(x_t, t, v2))
    torch.testing.assert_close(lhs, rhs)


def test_logit_normal_time_statistics():
    t = flow.sample_time(200_000, "logit_normal", generator=torch.Generator().manual_seed(0), t_min=1e-9)
    u = torch.logit(t.double())
    assert abs(u.mean().item() - math.log(2.0)) < 0.02
    assert abs(u.std().item() - 1.6) < 0.02


def test_uniform_and_shifted_times():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(100_000, "uniform", generator=g, t_min=1e-9)
    assert abs(t.mean().item() - 0.5) < 0.01
    shifted = flow.sample_time(100_000, "shifted", shift=3.0, generator=torch.Generator().manual_seed(0), t_min=1e-9)
    torch.testing.assert_close(shifted, flow.shift_time(t, 3.0))
    assert shifted.mean() > 0.6
    with pytest.raises(ValueError, match="unknown time scheme"):
        flow.sample_time(4, "cosine")


def test_expand_time_rejects_wrong_batch():
    with pytest.raises(ValueError, match="time must have shape"):
        flow.expand_time(torch.zeros(3), torch.zeros(4, 2))
