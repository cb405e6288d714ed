"""One SiD iteration (fake-score update + generator update) and the loss functions alone, on CPU.

    ./run bench -k sid_iteration        (pytest-benchmark; images/s in extra_info)
"""

import pytest
import torch

from sid_fast.config import load_config
from sid_fast.engine import LocalEngine
from sid_fast.losses import fake_score_loss, loss_weight, sid_generator_loss
from sid_fast.models import LabelConditions, MixtureTeacher, VelocityMLP, ring_mixture
from sid_fast.trainer import SiDTrainer


@pytest.mark.parametrize("num_steps", [1, 4])
def test_sid_iteration_exact_teacher(benchmark, tmp_path, num_steps):
    batch = 256
    config = load_config(overrides=[f"method.num_steps={num_steps}", f"train.batch_size={batch}", "train.progress=false",
                                    "method.kappa_fake_loss=1", "method.kappa_fake_gen=1", "method.kappa_teacher=1",
                                    f"train.out_dir={tmp_path}"])
    student = VelocityMLP(2, 256, 3)
    engine = LocalEngine(MixtureTeacher(ring_mixture()), VelocityMLP(2, 256, 3), VelocityMLP(2, 256, 3), config.optim)
    engine.fake_score.load_state_dict(student.state_dict())
    engine.generator.load_state_dict(student.state_dict())
    trainer = SiDTrainer(config, engine, LabelConditions(0), (2,))
    benchmark.pedantic(trainer.train_step, rounds=30, warmup_rounds=3)
    benchmark.extra_info["images_per_s"] = 2 * batch / benchmark.stats.stats.median


@pytest.mark.parametrize("preset", ["tiny", "medium"])
def test_sid_iteration_sd3_dit(benchmark, tmp_path, preset):
    """A SiD iteration on an SD3Transformer2DModel with random weights (sid_fast.models.tiny_components), κ = 4.5."""
    from sid_fast.api import init_student
    from sid_fast.config import TeacherConfig
    from sid_fast.models.registry import build_teacher

    batch = 4
    bundle = build_teacher(TeacherConfig(kind="sd3", preset=preset))
    config = load_config(overrides=["teacher.kind=sd3", f"teacher.preset={preset}", "method.num_steps=4",
                                    f"train.batch_size={batch}", "train.progress=false", f"train.out_dir={tmp_path}"])
    fake, generator = init_student(bundle.teacher, bundle.student)
    engine = LocalEngine(bundle.teacher, fake, generator, config.optim)
    trainer = SiDTrainer(config, engine, bundle.conditions, bundle.sample_shape)
    benchmark.pedantic(trainer.train_step, rounds=5 if preset == "medium" else 20, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = 2 * batch / benchmark.stats.stats.median
    benchmark.extra_info["sample_shape"] = list(bundle.sample_shape)


@pytest.mark.parametrize("shape", [(8, 4, 32, 32), (8, 16, 64, 64)])
def test_generator_loss_forward_backward(benchmark, shape):
    g = torch.Generator().manual_seed(0)
    x_t, x_g, v_r, v_f = (torch.randn(shape, generator=g, requires_grad=True) for _ in range(4))
    t = torch.rand(shape[0], generator=g)
    weight = loss_weight("one_minus_t", t)

    def step():
        sid_generator_loss(x_t, t, x_g, v_r, v_f, weight).mean().backward()

    benchmark(step)
    elements = torch.Size(shape).numel()
    benchmark.extra_info["GB_per_s_min_traffic"] = 4 * elements * 4 * 2 / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("shape", [(8, 16, 64, 64)])
def test_fake_score_loss_forward_backward(benchmark, shape):
    g = torch.Generator().manual_seed(0)
    velocity = torch.randn(shape, generator=g, requires_grad=True)
    x_g, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    benchmark(lambda: fake_score_loss(velocity, x_g, noise).mean().backward())
