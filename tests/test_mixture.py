import torch

from sid_fast.eval.distances import energy_distance, energy_noise_floor
from sid_fast.flow import velocity_to_score
from sid_fast.models import Conditioning, GaussianMixture, MixtureTeacher, random_mixture, ring_mixture
from sid_fast.sampler import euler_sample


def test_velocity_matches_autograd_score_of_log_density():
    # score of the noisy marginal from the exact velocity (§1, §9) equals grad log p_t computed by autograd
    mixture = random_mixture(4, 3, num_classes=2, seed=3)
    x = torch.randn(6, 3, dtype=torch.float64) * 2
    for label in (-1, 0, 1):
        labels = torch.full((6,), label)
        for t in (0.1, 0.5, 0.9):
            xr = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(mixture.log_prob(xr, labels, t=t).sum(), xr)
            velocity = mixture.velocity(x, torch.full((6,), t, dtype=torch.float64), labels)
            score = velocity_to_score(x, torch.full((6,), t, dtype=torch.float64), velocity)
            torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-8)


def test_single_gaussian_closed_form():
    # one component N(mu, s^2): v = eps_hat - x0_hat with the linear-Gaussian posterior
    mu, s = torch.tensor([[1.0, -2.0]], dtype=torch.float64), 0.5
    mixture = GaussianMixture(mu, torch.tensor([s]))
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    c = (1 - 0.3) ** 2 * s**2 + 0.3**2
    x0 = mu + (1 - 0.3) * s**2 / c * (x - (1 - 0.3) * mu)
    eps = (x - (1 - 0.3) * x0) / 0.3
    torch.testing.assert_close(mixture.velocity(x, t), eps - x0)


def test_class_weights_and_sampling():
    mixture = ring_mixture(8, num_classes=4)
    labels = torch.full((4000,), 2)
    samples = mixture.sample(4000, labels, generator=torch.Generator().manual_seed(0))
    nearest = torch.cdist(samples.double(), mixture.means).argmin(1)
    assert set(nearest.unique().tolist()) == {2, 6}


def test_euler_many_steps_reproduces_the_mixture():
    mixture = ring_mixture(8, 2.0, 0.2)
    teacher = MixtureTeacher(mixture)
    n = 2000
    floor = energy_noise_floor(lambda k: mixture.sample(k), n, repeats=5)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(labels=torch.full((n,), -1))
    many = euler_sample(teacher, z, cond, 200)
    few = euler_sample(teacher, z, cond, 2)
    truth = mixture.sample(n, generator=torch.Generator().manual_seed(2))
    assert energy_distance(many, truth) < 2.0 * floor
    assert energy_distance(few, truth) > 5.0 * floor  # the check can fail: 2 Euler steps are visibly wrong
