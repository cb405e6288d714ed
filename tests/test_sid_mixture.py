"""SiD on the exact mixture teacher (§9), data-free: the distilled one- and four-step generators reproduce
the true distribution (mode coverage, weights, energy distance near the sample-size noise floor) and beat
the teacher's own 4-step Euler sampler. The settings are the demo preset (sid_fast/presets/mixture_ring8.yaml)."""

import pytest
import torch

from sid_fast.api import init_student
from sid_fast.config import TeacherConfig, load_config
from sid_fast.demo.mixture import PRESET
from sid_fast.engine import LocalEngine
from sid_fast.eval.distances import energy_distance
from sid_fast.eval.mixture import score_samples
from sid_fast.models.registry import build_teacher
from sid_fast.sampler import euler_sample, few_step_sample
from sid_fast.trainer import SiDTrainer

N = 4000


@pytest.fixture(scope="module")
def ring():
    bundle = build_teacher(TeacherConfig(kind="mixture", preset="ring8"))
    mixture = bundle.reference
    rng = torch.Generator().manual_seed(100)
    floor = sum(energy_distance(mixture.sample(N, generator=rng), mixture.sample(N, generator=rng)) for _ in range(5)) / 5
    return bundle, floor


def distill(bundle, tmp_path, overrides):
    config = load_config(PRESET, [f"train.out_dir={tmp_path}", "train.progress=false"] + overrides)
    fake, generator = init_student(bundle.teacher, bundle.student)
    engine = LocalEngine(bundle.teacher, fake, generator, config.optim, ema_decay=config.train.ema_decay)
    SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape).fit()
    return config, engine.sampling_generator(ema=True)


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [1, 4])
def test_sid_matches_the_exact_distribution(ring, tmp_path, num_steps):
    bundle, floor = ring
    mixture = bundle.reference
    config, generator = distill(bundle, tmp_path, [f"method.num_steps={num_steps}"])
    cond = bundle.conditions.unconditional(N)
    z = torch.randn(N, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        samples = few_step_sample(generator, z, cond, num_steps, rng=torch.Generator().manual_seed(8))
    score = score_samples(samples, mixture, floor=floor, seed=11)
    euler4 = score_samples(euler_sample(bundle.teacher, z, cond, 4), mixture, floor=floor, seed=11)
    assert score.modes_covered == 8
    assert score.max_weight_error <= 0.05
    assert score.ratio <= 2.5, f"energy distance {score.ratio:.2f}x the noise floor"
    assert score.ratio <= 0.5 * euler4.ratio, f"SiD {score.ratio:.2f}x vs 4-step Euler {euler4.ratio:.2f}x"


@pytest.mark.slow
@pytest.mark.parametrize("kappas", [(2.0, 2.0, 2.0), (1.0, 1.0, 2.0)])
def test_guided_sid_stays_finite_and_covers_modes(tmp_path, kappas):
    bundle = build_teacher(TeacherConfig(kind="mixture", preset="ring8-cond4"))
    k1, k2, k4 = kappas
    _, generator = distill(bundle, tmp_path, [
        "teacher.preset=ring8-cond4", "train.iterations=1500", "method.num_steps=1", f"method.kappa_fake_loss={k1}",
        f"method.kappa_fake_gen={k2}", f"method.kappa_teacher={k4}",
    ])
    labels = torch.arange(2000) % 4
    cond = bundle.conditions.unconditional(2000)
    cond.labels = labels
    with torch.no_grad():
        samples = few_step_sample(generator, torch.randn(2000, 2), cond, 1)
    assert torch.isfinite(samples).all()
    mixture = bundle.reference
    for c in range(4):
        nearest = torch.cdist(samples[labels == c].double(), mixture.means).argmin(1)
        owned = {c, c + 4}
        # both of the class's modes are covered, and the samples stay on the class's own modes
        assert set(nearest.unique().tolist()) >= owned
        assert (torch.isin(nearest, torch.tensor(sorted(owned)))).double().mean() > 0.9
