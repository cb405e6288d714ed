"""The trainer gives the same losses with the torch, triton (interpreted) and cpp loss backends (§3, §4)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest
import torch

from sid_fast import kernels
from sid_fast.api import init_student
from sid_fast.config import load_config
from sid_fast.engine import LocalEngine
from sid_fast.kernels.ops import LOSS_OPS
from sid_fast.kernels.registry import Implementation
from sid_fast.models.mixture import LabelConditions, MixtureTeacher, random_mixture
from sid_fast.models.mlp import VelocityMLP
from sid_fast.trainer import SiDTrainer


def _run(backend: str, tmp_path, weighting: str = "one_minus_t", iterations: int = 3) -> tuple[list, dict]:
    config = load_config(overrides=[
        f"kernels.loss_backend={backend}", f"method.weighting={weighting}", "method.alpha=1.2",
        "method.kappa_fake_loss=3.0", "method.kappa_fake_gen=2.0", "method.kappa_teacher=4.5",
        "method.num_steps=2", "train.batch_size=8", "train.progress=false", "train.log_every=1",
        "optim.lr_generator=1e-3", "optim.lr_fake=1e-3", f"train.out_dir={tmp_path / backend}"])
    mixture = random_mixture(4, 5, num_classes=3, seed=0)  # 5-D latents: a prime per-sample size
    torch.manual_seed(0)
    student = VelocityMLP(5, hidden=32, depth=2, num_classes=3)
    fake_score, generator = init_student(MixtureTeacher(mixture), student)
    engine = LocalEngine(MixtureTeacher(mixture), fake_score, generator, config.optim, device="cpu")
    trainer = SiDTrainer(config, engine, LabelConditions(3), (5,))
    history = [trainer.train_step() for _ in range(iterations)]
    return [(s.loss_fake, s.loss_generator) for s in history], engine.generator_state_dict(ema=False)


def _count_calls(monkeypatch, backend: str) -> dict:
    """Wrap `backend`'s implementations so the test knows the kernels ran (no silent fallback)."""
    calls = {}
    for name in LOSS_OPS:
        impl = kernels.get_op(name).implementations[backend]

        def counted(*args, _forward=impl.forward, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _forward(*args)

        monkeypatch.setitem(kernels.get_op(name).implementations, backend,
                            Implementation(counted, impl.backward, impl.eligible))
    return calls


@pytest.mark.parametrize("weighting", ["one_minus_t", "sid"])
def test_trainer_losses_match_across_backends(tmp_path, monkeypatch, weighting):
    reference, reference_state = _run("torch", tmp_path, weighting)
    for backend in ("triton", "cpp"):
        calls = _count_calls(monkeypatch, backend)
        losses, state = _run(backend, tmp_path, weighting)
        assert calls == {"cfg_sid_generator_loss": 3, "cfg_fake_score_loss": 3}, calls
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-4, atol=1e-5)
        for name, value in reference_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-3, atol=1e-5, msg=f"{backend}: {name}")


def test_unknown_loss_backend_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="kernels.loss_backend"):
        _run("nope", tmp_path, iterations=0)
    with pytest.raises(ValueError, match="kernels.loss_backend"):
        load_config(overrides=["kernels.loss_backend=not a name"])
