import pytest
import torch

from sid_fast.checkpoint import CheckpointError, latest_checkpoint, verify
from sid_fast.config import load_config
from sid_fast.engine import LocalEngine
from sid_fast.models import LabelConditions, MixtureTeacher, VelocityMLP, ring_mixture
from sid_fast.trainer import SiDTrainer


def make_trainer(out_dir, **extra):
    torch.manual_seed(0)
    student = VelocityMLP(2, 32, 2, num_classes=4)
    overrides = [
        "method.num_steps=2", "method.kappa_fake_loss=2", "method.kappa_fake_gen=2", "method.kappa_teacher=2",
        "optim.lr_generator=1e-3", "optim.lr_fake=1e-3", "train.batch_size=16", "train.ema_decay=0.99",
        "train.ckpt_every=3", "train.log_every=1", "train.progress=false", f"train.out_dir={out_dir}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    config = load_config(overrides=overrides)
    fake, generator = VelocityMLP(2, 32, 2, num_classes=4), VelocityMLP(2, 32, 2, num_classes=4)
    fake.load_state_dict(student.state_dict())
    generator.load_state_dict(student.state_dict())
    engine = LocalEngine(MixtureTeacher(ring_mixture(8, num_classes=4)), fake, generator, config.optim,
                         ema_decay=config.train.ema_decay)
    return SiDTrainer(config, engine, LabelConditions(4), (2,))


def test_resume_is_bit_exact(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.fit(8)
    first = make_trainer(tmp_path / "b")
    first.fit(5)  # checkpoints at 3 and (end) 5
    resumed = make_trainer(tmp_path / "b")
    resumed.fit(8)
    assert resumed.history[0]["step"] == 6
    straight_tail = [h for h in straight.history if h["step"] > 5]
    assert [(h["loss_fake"], h.get("loss_generator")) for h in straight_tail] == \
        [(h["loss_fake"], h.get("loss_generator")) for h in resumed.history]
    for a, b in zip(straight.engine.generator.parameters(), resumed.engine.generator.parameters()):
        assert torch.equal(a, b)
    for name in straight.engine.ema.shadow:
        assert torch.equal(straight.engine.ema.shadow[name], resumed.engine.ema.shadow[name])


def test_truncated_checkpoint_is_detected_and_previous_is_intact(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit(6)  # checkpoints at 3 and 6
    root = tmp_path / "checkpoints"
    newest = latest_checkpoint(root)
    assert newest.name == "step-00000006"
    target = newest / "generator.safetensors"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="generator.safetensors is truncated"):
        make_trainer(tmp_path).resume()
    verify(root / "step-00000003")  # raises if the previous one were damaged
    again = make_trainer(tmp_path)
    assert again.resume(root / "step-00000003") and again.step == 3


def test_crash_during_save_keeps_latest(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    trainer.fit(3)
    root = tmp_path / "checkpoints"

    def broken(directory):
        (directory / "generator.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer.engine, "save_state", broken)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(6)
    assert latest_checkpoint(root).name == "step-00000003"
    verify(root / "step-00000003")
    monkeypatch.undo()
    resumed = make_trainer(tmp_path)
    assert resumed.resume() and resumed.step == 3


def test_keeps_only_the_newest(tmp_path):
    trainer = make_trainer(tmp_path, **{"train.keep_checkpoints": 1})
    trainer.fit(7)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000007"]
