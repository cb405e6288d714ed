import torch

from sid_fast.config import load_config
from sid_fast.engine import LocalEngine
from sid_fast.models import LabelConditions, MixtureTeacher, VelocityMLP, ring_mixture
from sid_fast.trainer import SiDTrainer


def _trainer(tmp_path, *overrides):
    torch.manual_seed(0)
    config = load_config(overrides=["method.num_steps=1", "method.kappa_fake_loss=1", "method.kappa_fake_gen=1",
                                    "method.kappa_teacher=1", "train.batch_size=8", "train.progress=false",
                                    "health.tensorboard=false", f"train.out_dir={tmp_path}", *overrides])
    engine = LocalEngine(MixtureTeacher(ring_mixture()), VelocityMLP(2, 16, 2), VelocityMLP(2, 16, 2), config.optim,
                         grad_accum=config.train.grad_accum)
    return SiDTrainer(config, engine, LabelConditions(0), (2,))


def test_fake_updates_per_iteration(tmp_path):
    trainer = _trainer(tmp_path, "train.fake_updates=3", "train.grad_accum=2")
    for _ in range(2):
        trainer.train_step()
    assert trainer.engine.updates == {"fake_score": 6, "generator": 2}
    assert trainer.images_seen == 2 * (3 + 1) * 2 * 8


def test_fake_warmup_holds_the_generator(tmp_path):
    trainer = _trainer(tmp_path, "train.fake_warmup_iters=2")
    before = [p.clone() for p in trainer.engine.generator.parameters()]
    stats = [trainer.train_step() for _ in range(2)]
    assert all(s.loss_generator is None for s in stats)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.engine.generator.parameters()))
    assert trainer.train_step().loss_generator is not None
    assert trainer.engine.updates == {"fake_score": 3, "generator": 1}
