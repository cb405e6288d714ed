"""SiD on the exact mixture teacher (§9), data-free: the distilled one- and four-step generators reproduce
the true distribution (mode coverage, weights, energy distance near the sample-size noise floor) and beat
the teacher's own 4-step Euler sampler. The settings are the demo preset (sid_fast/presets/mixture_ring8.yaml).

The four distillations run in two worker processes side by side at one thread each (tests/mixture_lanes.py,
tests/mixture_worker.py), started when the test session starts (tests/conftest.py) so that they overlap the rest
of the suite; each test waits for its own job, bounded."""

import pytest
import torch
from mixture_lanes import KAPPAS

from sid_fast.api import init_student
from sid_fast.config import TeacherConfig
from sid_fast.eval.distances import energy_noise_floor
from sid_fast.eval.mixture import score_samples
from sid_fast.models.registry import build_teacher
from sid_fast.sampler import euler_sample, few_step_sample

N = 4000


def generator_of(bundle, state: dict) -> torch.nn.Module:
    _, generator = init_student(bundle.teacher, bundle.student)
    generator.load_state_dict(state)
    return generator.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ring():
    bundle = build_teacher(TeacherConfig(kind="mixture", preset="ring8"))
    mixture = bundle.reference
    rng = torch.Generator().manual_seed(100)
    floor = energy_noise_floor(lambda n: mixture.sample(n, generator=rng), N, repeats=5)
    return bundle, floor


@pytest.fixture(scope="module", params=[1, 4], ids=["1-step", "4-step"])
def distilled(request, ring, mixture_lanes):
    """Distil a K-step generator once per module with the demo preset and score three sample sets against
    three fresh true sets (a steadier estimate than one draw); also score the teacher's 4-step Euler sampler."""
    num_steps = request.param
    bundle, floor = ring
    mixture = bundle.reference
    generator = generator_of(bundle, mixture_lanes.state(f"{num_steps}-step"))
    cond = bundle.conditions.unconditional(N)
    scores, euler4 = [], []
    for draw in range(3):
        z = torch.randn(N, 2, generator=torch.Generator().manual_seed(7 + draw))
        with torch.no_grad():
            samples = few_step_sample(generator, z, cond, num_steps, rng=torch.Generator().manual_seed(20 + draw))
        scores.append(score_samples(samples, mixture, floor=floor, seed=11 + draw))
        euler4.append(score_samples(euler_sample(bundle.teacher, z, cond, 4), mixture, floor=floor, seed=11 + draw))
    return num_steps, scores, sum(s.ratio for s in scores) / 3, sum(s.ratio for s in euler4) / 3


@pytest.mark.slow
def test_sid_covers_every_mode_with_the_right_weights_and_beats_4_step_euler(distilled):
    num_steps, scores, ratio, euler_ratio = distilled
    assert all(s.modes_covered == 8 for s in scores)
    assert max(s.max_weight_error for s in scores) <= 0.05
    assert ratio <= 0.5 * euler_ratio, f"SiD {num_steps}-step {ratio:.2f}x vs 4-step Euler {euler_ratio:.2f}x the floor"


@pytest.mark.slow
def test_sid_energy_distance_near_the_noise_floor(distilled):
    num_steps, _, ratio, _ = distilled
    assert ratio <= 2.5, f"energy distance {ratio:.2f}x the noise floor"


@pytest.mark.slow
@pytest.mark.parametrize("kappas", KAPPAS)
def test_guided_sid_stays_finite_and_covers_modes(mixture_lanes, kappas):
    bundle = build_teacher(TeacherConfig(kind="mixture", preset="ring8-cond4"))
    k1, k2, k4 = kappas
    generator = generator_of(bundle, mixture_lanes.state(f"guided-{k1}-{k2}-{k4}"))
    labels = torch.arange(2000) % 4
    cond = bundle.conditions.unconditional(2000)
    cond.labels = labels
    with torch.no_grad():
        samples = few_step_sample(generator, torch.randn(2000, 2, generator=torch.Generator().manual_seed(5)), cond, 1)
    assert torch.isfinite(samples).all()
    mixture = bundle.reference
    for c in range(4):
        nearest = torch.cdist(samples[labels == c].double(), mixture.means).argmin(1)
        owned = {c, c + 4}
        # both of the class's modes are covered, and the samples stay on the class's own modes
        assert set(nearest.unique().tolist()) >= owned
        assert (torch.isin(nearest, torch.tensor(sorted(owned)))).double().mean() > 0.9
