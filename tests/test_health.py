"""Health signals: NaN/inf reported with step, network and tensor, no update applied (stop and skip modes);
the collapse warning; logged signals (grad norms, teacher–fake distance, memory, FLOPs, TensorBoard)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from sid_fast.api import init_student
from sid_fast.config import load_config
from sid_fast.engine.local import LocalEngine
from sid_fast.health import CollapseMonitor, NonFiniteError, mean_pairwise_distance
from sid_fast.models.mixture import LabelConditions, MixtureTeacher, ring_mixture
from sid_fast.models.mlp import VelocityMLP
from sid_fast.trainer import SiDTrainer

BAD_STEP = 2


class NaNOnStep(nn.Module):
    """The exact teacher, returning NaN in every call made while trainer.step == BAD_STEP."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher, self.trainer = teacher, None

    def forward(self, x_t, t, cond):
        velocity = self.teacher(x_t, t, cond)
        if self.trainer is not None and self.trainer.step == BAD_STEP:
            velocity = velocity.clone()
            velocity[0] = float("nan")
        return velocity


def _trainer(tmp_path, *overrides):
    torch.manual_seed(0)
    teacher = NaNOnStep(MixtureTeacher(ring_mixture(8, 2.0, 0.2, num_classes=4)))
    student = VelocityMLP(2, hidden=32, depth=2, num_classes=4, time_dim=16)
    config = load_config(None, ["method.num_steps=1", "train.batch_size=8", "train.iterations=4", "train.progress=false",
                                "train.resume=false", f"train.out_dir={tmp_path}", "train.log_every=1",
                                "optim.lr_generator=1e-3", "optim.lr_fake=1e-3", *overrides])
    fake, generator = init_student(teacher, student)
    engine = LocalEngine(teacher, fake, generator, config.optim)
    trainer = SiDTrainer(config, engine, LabelConditions(4), (2,))
    teacher.trainer = trainer
    return trainer


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_nan_in_teacher_output_stops_naming_step_network_tensor(tmp_path):
    trainer = _trainer(tmp_path, "health.on_nonfinite=stop", "health.tensorboard=false", "health.defer_checks=false")
    for _ in range(BAD_STEP):
        trainer.train_step()
    before = _weights(trainer.engine.generator)
    with pytest.raises(NonFiniteError) as error:
        trainer.train_step()
    message = str(error.value)
    assert f"step {BAD_STEP}" in message and "teacher" in message and "velocity" in message and "NaN" in message
    after = trainer.engine.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the bad update was applied"


def test_deferred_checks_stop_at_the_next_read_naming_the_first_bad_step_and_save_nothing_past_it(tmp_path):
    """health.defer_checks (the default): no host sync per step; the NaN of step 2 is found at the next read (the
    checkpoint after it), reported with its own step, and no checkpoint holds weights trained past it."""
    trainer = _trainer(tmp_path, "health.on_nonfinite=stop", "health.tensorboard=false", "train.log_every=10",
                       "train.ckpt_every=1", "train.iterations=6")
    with pytest.raises(NonFiniteError) as error:
        trainer.fit()
    message = str(error.value)
    assert message.startswith(f"step {BAD_STEP}: ") and "teacher" in message and "guided velocity" in message
    assert "1 non-finite" in message and f"after step {BAD_STEP}" in message
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved == [f"step-{BAD_STEP - 1:08d}", f"step-{BAD_STEP:08d}"], saved  # step-3 would hold the NaN update


def test_nan_in_teacher_output_skips_that_update_and_continues(tmp_path, caplog):
    trainer = _trainer(tmp_path, "health.on_nonfinite=skip", "health.tensorboard=false")
    for _ in range(BAD_STEP):
        trainer.train_step()
    before = _weights(trainer.engine.generator)
    with caplog.at_level(logging.WARNING, logger="sid_fast.health"):
        stats = trainer.train_step()
    assert stats.skipped == "generator"
    assert any(f"step {BAD_STEP}" in r.message and "teacher" in r.message for r in caplog.records)
    after = _weights(trainer.engine.generator)
    assert all(torch.equal(before[k], after[k]) for k in before), "the skipped update was applied"
    trainer.train_step()  # the next step trains again
    assert any(not torch.equal(after[k], v) for k, v in trainer.engine.generator.state_dict().items())
    assert trainer.guard.skipped[0]["network"] == "generator"


def test_skip_needs_no_accumulation():
    with pytest.raises(ValueError, match="health.on_nonfinite"):
        _trainer("/nonexistent", "health.on_nonfinite=skip", "train.grad_accum=2")


def test_fit_logs_health_signals_and_tensorboard(tmp_path):
    trainer = _trainer(tmp_path, "health.collapse_every=2", "health.peak_tflops=1.0", "train.iterations=2")
    trainer.teacher = None
    trainer.engine.teacher.trainer = None  # no NaN in this run
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("loss_fake", "loss_generator", "grad_norm_fake", "grad_norm_generator", "teacher_fake_mse",
                "images_per_s", "peak_rss_gib", "tflops_per_s", "mfu", "pairwise_distance"):
        assert key in last, key
    assert last["teacher_fake_mse"] > 0 and last["tflops_per_s"] > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_collapse_warning_when_diversity_falls(caplog):
    monitor = CollapseMonitor(0.5)
    spread = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    assert monitor.update(spread, 1)["collapse_warning"] is False
    with caplog.at_level(logging.WARNING, logger="sid_fast.health"):
        result = monitor.update(0.1 * spread, 2)
    assert result["collapse_warning"] is True and "collapse" in caplog.text
    assert result["pairwise_distance"] == pytest.approx(0.1 * mean_pairwise_distance(spread), rel=1e-6)
