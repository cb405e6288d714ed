import pytest
import torch

from sid_fast.losses import (
    WEIGHTINGS,
    cfg_fake_score_loss,
    cfg_sid_generator_loss,
    fake_score_loss,
    loss_weight,
    sid_generator_loss,
)


def _inputs(shape=(4, 3, 5, 5), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
    t = torch.rand(shape[0], generator=g) * 0.9 + 0.05
    return make(), t, make(), make(), make()


def test_generator_loss_equivalent_form():
    # §3: λ[(1 - α)||y_r - y_f||^2 + (y_r - y_f)·(y_f - x_g)]
    x_t, t, x_g, v_r, v_f = _inputs(dtype=torch.float64)
    alpha, scale = 1.2, 100.0
    weight = loss_weight("one_minus_t", t)
    loss = sid_generator_loss(x_t, t, x_g, v_r, v_f, weight, alpha, scale)
    tb = t.view(-1, 1, 1, 1).double()
    y_r, y_f = x_t - tb * v_r, x_t - tb * v_f
    other = scale * weight.double() * ((1 - alpha) * ((y_r - y_f) ** 2) + (y_r - y_f) * (y_f - x_g)).flatten(1).sum(1)
    torch.testing.assert_close(loss.double(), other, rtol=1e-5, atol=1e-4)
    assert loss.shape == (4,)


def test_losses_are_fp32_for_low_precision_inputs():
    x_t, t, x_g, v_r, v_f = _inputs(dtype=torch.bfloat16)
    loss = sid_generator_loss(x_t, t, x_g, v_r, v_f, loss_weight("one_minus_t", t))
    assert loss.dtype == torch.float32
    exact = sid_generator_loss(x_t.float(), t, x_g.float(), v_r.float(), v_f.float(), loss_weight("one_minus_t", t))
    torch.testing.assert_close(loss, exact)
    assert fake_score_loss(v_r, x_g, x_t).dtype == torch.float32


def test_fake_score_loss_is_summed_squared_error():
    _, _, x_g, velocity, noise = _inputs()
    expected = ((velocity - (noise - x_g)) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(fake_score_loss(velocity, x_g, noise), expected)


def test_cfg_forms_match_manual_combination():
    x_t, t, x_g, a, b = _inputs(seed=1)
    _, _, c, d, noise = _inputs(seed=2)
    weight = loss_weight("one_minus_t", t)
    fused = cfg_sid_generator_loss(x_t, t, x_g, a, b, c, d, 4.5, 2.0, weight, 1.0, 100.0)
    manual = sid_generator_loss(x_t, t, x_g, a + 4.5 * (b - a), c + 2.0 * (d - c), weight, 1.0, 100.0)
    torch.testing.assert_close(fused, manual)
    torch.testing.assert_close(cfg_fake_score_loss(a, b, 3.0, x_g, noise), fake_score_loss(a + 3.0 * (b - a), x_g, noise))


def test_weightings():
    t = torch.tensor([0.25, 0.5])
    expected = {
        "one_minus_t": [0.75, 0.5], "one_minus_t_sq": [0.5625, 0.25], "inv_t": [4.0, 2.0],
        "inv_t_sq": [16.0, 4.0], "snr": [9.0, 1.0],
    }
    for name, values in expected.items():
        torch.testing.assert_close(loss_weight(name, t), torch.tensor(values))
    x_g = torch.zeros(2, 3)
    x0_teacher = torch.tensor([[1.0, 1.0, 1.0], [2.0, -2.0, 2.0]])
    torch.testing.assert_close(loss_weight("sid", t, x_g=x_g, x0_teacher=x0_teacher), torch.tensor([1.0, 0.5]))
    assert set(expected) | {"sid"} == set(WEIGHTINGS)
    with pytest.raises(ValueError, match="unknown weighting"):
        loss_weight("edm", t)
    with pytest.raises(ValueError, match="needs x_g"):
        loss_weight("sid", t)


def test_weight_carries_no_gradient():
    t = torch.rand(3, requires_grad=True)
    assert not loss_weight("inv_t", t).requires_grad
