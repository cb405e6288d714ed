"""§3 gradient flow: the generator gradient equals autograd of the formula written out independently,
and teacher / fake-score parameters receive no gradient in the generator step."""

import copy

import torch

from sid_fast.config import load_config
from sid_fast.engine import LocalEngine
from sid_fast.flow import sample_time
from sid_fast.models import LabelConditions, VelocityMLP
from sid_fast.trainer import SiDTrainer


def _setup(tmp_path, kappa=1.0):
    torch.manual_seed(0)
    teacher, fake, generator = VelocityMLP(3, 32, 2), VelocityMLP(3, 32, 2), VelocityMLP(3, 32, 2)
    config = load_config(overrides=[
        "method.num_steps=1", "method.alpha=1.2", f"method.kappa_teacher={kappa}", f"method.kappa_fake_gen={kappa}",
        "method.weighting=one_minus_t", "train.batch_size=8", f"train.out_dir={tmp_path}",
    ])
    engine = LocalEngine(teacher, fake, generator, config.optim)
    return config, engine, SiDTrainer(config, engine, LabelConditions(0), (3,))


def test_generator_gradient_matches_independent_formula(tmp_path):
    config, engine, trainer = _setup(tmp_path)
    state = trainer.rng.get_state()
    loss = trainer.generator_loss(steps_run=1)
    loss.backward()
    assert all(p.grad is None for p in engine.teacher.parameters())
    assert all(p.grad is None for p in engine.fake_score.parameters())
    assert all(p.requires_grad for p in engine.fake_score.parameters())  # restored after the step
    trainer_grads = [p.grad.clone() for p in engine.generator.parameters()]

    # independent computation with the same random draws (z, eps, t in the trainer's order)
    rng = torch.Generator().manual_seed(0)
    rng.set_state(state)
    generator = copy.deepcopy(engine.generator)
    generator.zero_grad()
    cond = LabelConditions(0).unconditional(8)
    z = torch.randn(8, 3, generator=rng)
    x_g = z - generator(z, torch.ones(8), cond)  # §2 one step: D_0 = z - G(z, 1, c)
    eps = torch.randn(8, 3, generator=rng)
    t = sample_time(8, generator=rng)
    x_t = (1 - t[:, None]) * x_g + t[:, None] * eps
    y_r = x_t - t[:, None] * engine.teacher(x_t, t, cond)
    y_f = x_t - t[:, None] * engine.fake_score(x_t, t, cond)
    lam = (1 - t)[:, None]
    per_element = lam * (y_r - y_f) * ((y_r - x_g) - 1.2 * (y_r - y_f))
    expected = 100.0 * per_element.sum(1).mean()
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(expected, list(generator.parameters()))
    for got, want in zip(trainer_grads, grads):
        torch.testing.assert_close(got, want)


def test_fake_step_trains_only_the_fake_score(tmp_path):
    config, engine, trainer = _setup(tmp_path, kappa=2.0)
    loss = trainer.fake_score_loss(steps_run=1)
    loss.backward()
    assert all(p.grad is None for p in engine.generator.parameters())
    assert all(p.grad is None for p in engine.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.fake_score.parameters())
