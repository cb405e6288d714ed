"""Fixed points of SiD (§3): the generator gradient vanishes when the fake score equals the teacher, an
exact fake score drives a Gaussian generator to the data, and a trained fake score recovers the exact
velocity of the generator's distribution."""

import copy

import torch
from torch import nn

from sid_fast.config import load_config
from sid_fast.engine import LocalEngine
from sid_fast.flow import interpolate, sample_time
from sid_fast.losses import fake_score_loss, loss_weight, sid_generator_loss
from sid_fast.models import GaussianMixture, LabelConditions, MixtureTeacher, VelocityMLP
from sid_fast.trainer import SiDTrainer

UNCOND = LabelConditions(0)


def test_gradient_vanishes_when_fake_equals_teacher(tmp_path):
    teacher = VelocityMLP(2, 32, 2)
    config = load_config(overrides=["method.num_steps=1", "train.batch_size=64", f"train.out_dir={tmp_path}"])
    engine = LocalEngine(teacher, copy.deepcopy(teacher), VelocityMLP(2, 32, 2), config.optim)
    trainer = SiDTrainer(config, engine, UNCOND, (2,))
    trainer.generator_loss(1).backward()
    grads = torch.cat([p.grad.flatten() for p in engine.generator.parameters()])
    assert grads.abs().max() < 1e-6


class GaussianGenerator(nn.Module):
    """One-step generator whose output is N(mean, exp(log_std)^2 I): velocity at t = 1 is z - (m + s z)."""

    def __init__(self, mean, log_std):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(mean))
        self.log_std = nn.Parameter(torch.tensor(log_std))

    def forward(self, x_t, t, cond):
        return x_t - (self.mean + self.log_std.exp() * x_t)

    def distribution(self) -> GaussianMixture:
        return GaussianMixture(self.mean.detach()[None].double(), self.log_std.detach().exp()[None].double())


def test_exact_fake_score_drives_a_gaussian_generator_to_the_data():
    data = GaussianMixture(torch.tensor([[1.0, -1.0]]), torch.tensor([0.5]))
    teacher = MixtureTeacher(data)
    generator = GaussianGenerator([-0.5, 0.5], 0.3)
    optimizer = torch.optim.Adam(generator.parameters(), lr=0.02, betas=(0.0, 0.999))
    rng = torch.Generator().manual_seed(0)
    cond = UNCOND.unconditional(512)
    for _ in range(400):
        fake = MixtureTeacher(generator.distribution())  # the exact score of the current generator
        z = torch.randn(512, 2, generator=rng)
        x_g = z - generator(z, torch.ones(512), cond)
        noise, t = torch.randn(512, 2, generator=rng), sample_time(512, generator=rng)
        x_t = interpolate(x_g, noise, t)
        loss = sid_generator_loss(x_t, t, x_g, teacher(x_t, t, cond), fake(x_t, t, cond), loss_weight("one_minus_t", t))
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    torch.testing.assert_close(generator.mean.detach(), torch.tensor([1.0, -1.0]), atol=0.05, rtol=0)
    assert abs(generator.log_std.exp().item() - 0.5) < 0.03


def test_trained_fake_score_matches_the_generators_exact_velocity():
    generated = GaussianMixture(torch.tensor([[0.5, -0.5]]), torch.tensor([0.7]))
    fake = VelocityMLP(2, 128, 3)
    optimizer = torch.optim.Adam(fake.parameters(), lr=2e-3)
    rng = torch.Generator().manual_seed(0)
    cond = UNCOND.unconditional(512)
    for step in range(1500):
        if step == 1000:  # a short low-lr phase, as any regression to convergence would end
            optimizer.param_groups[0]["lr"] = 3e-4
        x_g = generated.sample(512, generator=rng)
        noise, t = torch.randn(512, 2, generator=rng), sample_time(512, "uniform", generator=rng)
        loss = fake_score_loss(fake(interpolate(x_g, noise, t), t, cond), x_g, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_g = generated.sample(2000, generator=rng)
    t = torch.rand(2000, generator=rng) * 0.9 + 0.05
    x_t = interpolate(x_g, torch.randn(2000, 2, generator=rng), t)
    with torch.no_grad():
        learned = fake(x_t, t, UNCOND.unconditional(2000))
    exact = generated.velocity(x_t, t)
    relative = ((learned - exact) ** 2).sum() / (exact**2).sum()
    assert relative < 0.01, f"relative squared error {relative:.4f}"
