"""In-loop evaluation and best-checkpoint retention (sid_fast.eval.inloop)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sid_fast.api import init_student
from sid_fast.config import load_config
from sid_fast.engine.local import LocalEngine
from sid_fast.eval.inloop import BestCheckpoints, InLoopEvaluator
from sid_fast.eval.metrics import FeatureStats, FrechetMetric
from sid_fast.models.mixture import LabelConditions, MixtureTeacher, ring_mixture
from sid_fast.models.mlp import VelocityMLP
from sid_fast.models.protocol import Conditioning
from sid_fast.trainer import SiDTrainer


def _write(tag):
    def write(path):
        path.write_text(tag)
    return write


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_retention_keeps_exactly_the_best_set(tmp_path, keep):
    best = BestCheckpoints(tmp_path, keep)
    values = {1: 5.0, 2: 3.0, 3: 4.0, 4: 9.0, 5: 1.0, 6: float("nan"), 7: 2.0}
    for step, value in values.items():
        best.offer(step, value, _write(str(step)))
    finite = sorted((v, s) for s, v in values.items() if v == v)
    expected = {f"step-{s:08d}.safetensors" for _, s in finite[:keep]}
    assert {p.name for p in tmp_path.glob("step-*")} == expected
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["file"] for e in index] == [f"step-{s:08d}.safetensors" for _, s in finite[:keep]]
    reopened = BestCheckpoints(tmp_path, keep)  # the index survives a restart
    assert reopened.files() == best.files()


def test_never_deletes_the_only_checkpoint(tmp_path):
    best = BestCheckpoints(tmp_path, 1)
    assert best.offer(1, 2.0, _write("a"))
    for step, value in ((2, 3.0), (3, float("inf")), (4, float("nan")), (5, 2.5)):
        assert not best.offer(step, value, _write("b"))
        assert [p.name for p in tmp_path.glob("step-*")] == ["step-00000001.safetensors"]
    higher = BestCheckpoints(tmp_path / "clip", 1, higher_is_better=True)
    higher.offer(1, 0.30, _write("a"))
    higher.offer(2, 0.25, _write("b"))
    assert [p.name for p in (tmp_path / "clip").glob("step-*")] == ["step-00000001.safetensors"]
    with pytest.raises(ValueError, match="eval.keep_best"):
        BestCheckpoints(tmp_path, 0)


def test_inloop_evaluation_during_fit_on_the_toy(tmp_path):
    mixture = ring_mixture(8, 2.0, 0.2, num_classes=4)
    torch.manual_seed(0)
    student = VelocityMLP(2, hidden=32, depth=2, num_classes=4, time_dim=16)
    config = load_config(None, ["method.num_steps=1", "train.batch_size=8", "train.iterations=4", "train.progress=false",
                                "train.resume=false", f"train.out_dir={tmp_path}", "train.log_every=1",
                                "eval.every_images=16", "eval.num_samples=32", "eval.keep_best=2", "eval.grid=16",
                                "health.tensorboard=false"])
    teacher = MixtureTeacher(mixture)
    fake, generator = init_student(teacher, student)
    trainer = SiDTrainer(config, LocalEngine(teacher, fake, generator, config.optim), LabelConditions(4), (2,))
    labels = torch.arange(32) % 4
    real = FeatureStats(2)
    real.update(mixture.sample(512, labels.repeat(16), generator=torch.Generator().manual_seed(5)))
    trainer.evaluator = InLoopEvaluator(config, Conditioning(labels=labels), FrechetMetric(lambda x: x.flatten(1), real.mean_cov()))
    history = trainer.fit()
    evaluations = [r for r in history if "eval_fd" in r]
    assert len(evaluations) == 4  # 16 images per iteration (both steps), one evaluation per 16 images
    values = [r["eval_fd"] for r in evaluations]
    assert all(v > 0 for v in values)
    kept = sorted(tmp_path.joinpath("best").glob("step-*.safetensors"))
    steps = sorted(r["step"] for r in sorted(evaluations, key=lambda r: r["eval_fd"])[:2])
    assert [p.name for p in kept] == [f"step-{s:08d}.safetensors" for s in steps]
    assert set(load_file(kept[0])) == set(generator.state_dict())
    assert (tmp_path / "eval" / f"step-{evaluations[0]['step']:08d}.png").is_file()
    # fixed prompts and seeds: evaluating the same weights twice gives the same value
    again = trainer.evaluator.evaluate(trainer)["eval_fd"]
    assert again == pytest.approx(values[-1], rel=1e-9)
