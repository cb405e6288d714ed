"""SiD²ₐ (DESIGN.md §5): discriminator losses, feature capture (velocity untouched), ZeRO-3 1 vs 2 ranks, and a
short data-aided run on the exact toy mixture with real samples from the mixture."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file, save_file

from sid_fast.adversarial import MixtureRealData, build_data_aided_trainer, discriminator_logits, velocity_and_logits
from sid_fast.config import load_config
from sid_fast.losses_adv import adversarial_generator_loss, discriminator_loss
from sid_fast.models import tiny_components
from sid_fast.models.flux import FluxAdapter
from sid_fast.models.mixture import LabelConditions, MixtureTeacher, ring_mixture
from sid_fast.models.mlp import VelocityMLP
from sid_fast.models.protocol import Conditioning
from sid_fast.models.registry import TeacherBundle
from sid_fast.models.sana import SanaAdapter
from sid_fast.models.sd3 import SD3Adapter

ROOT = Path(__file__).resolve().parents[1]


def _bce(p_logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-p_logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_losses_follow_section5_with_clamp():
    real = torch.tensor([[0.5, -20.0], [3.0, 1.0]])
    fake = torch.tensor([[-1.0, 15.0], [0.0, 2.0]])
    elements = 7
    got = discriminator_loss(real, fake, elements)
    for b in range(2):
        r = sum(_bce(max(-10, min(10, v)), 1.0) for v in real[b].tolist()) / 2
        f = sum(_bce(max(-10, min(10, v)), 0.0) for v in fake[b].tolist()) / 2
        assert got[b].item() == pytest.approx(elements * 0.5 * (r + f), rel=1e-5)
    weight = torch.tensor([0.25, 0.8])
    adv = adversarial_generator_loss(fake, weight, elements)
    for b in range(2):
        expected = elements * weight[b].item() * sum(_bce(max(-10, min(10, v)), 1.0) for v in fake[b].tolist()) / 2
        assert adv[b].item() == pytest.approx(expected, rel=1e-5)
    leaf = torch.tensor([[20.0, 0.0]], requires_grad=True)  # clamped channel gets no gradient, the other does
    adversarial_generator_loss(leaf, torch.ones(1), 1).sum().backward()
    assert leaf.grad[0, 0] == 0 and leaf.grad[0, 1] != 0


def _dit_cases():
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(embeds=torch.randn(2, 8, 32, generator=g), pooled=torch.randn(2, 64, generator=g))
    sd3 = SD3Adapter(tiny_components.seeded(lambda: tiny_components.transformer("sd3", "tiny"), 0))
    flux = FluxAdapter(tiny_components.seeded(lambda: tiny_components.transformer("flux", "tiny"), 0))
    flux_cond = Conditioning(embeds=cond.embeds, pooled=torch.randn(2, 32, generator=g))
    sana = SanaAdapter(tiny_components.seeded(lambda: tiny_components.transformer("sana", "tiny"), 0))
    sana_cond = Conditioning(embeds=cond.embeds, mask=torch.ones(2, 8, dtype=torch.long))
    patch = {name: m.transformer.config.patch_size for name, m in (("sd3", sd3), ("sana", sana))}
    return [("sd3", sd3, cond, (16, 8, 8), 64 // patch["sd3"] ** 2), ("flux", flux, flux_cond, (16, 8, 6), 12),
            ("sana", sana, sana_cond, (8, 8, 8), 64 // patch["sana"] ** 2)]


@pytest.mark.parametrize("case", range(3), ids=["sd3", "flux", "sana"])
def test_dit_features_are_final_norm_image_tokens_and_velocity_unchanged(case):
    name, model, cond, shape, image_tokens = _dit_cases()[case]
    if name == "sd3" and model.transformer.config.pooled_projection_dim != 64:
        cond = Conditioning(embeds=cond.embeds, pooled=torch.randn(2, model.transformer.config.pooled_projection_dim))
    x_t, t = torch.randn(2, *shape), torch.tensor([0.3, 0.8])
    tokens = []
    handle = model.transformer.norm_out.register_forward_hook(lambda m, a, out: tokens.append(out))
    with torch.no_grad():
        plain = model(x_t, t, cond)
        velocity, logits = velocity_and_logits(model, x_t, t, cond)
    handle.remove()
    assert torch.equal(plain, velocity), "the hook changed the velocity"
    final = tokens[1]  # output of the final adaptive norm in the hooked call: (B, N, D)
    assert final.shape[1] == image_tokens, f"{name}: expected {image_tokens} image tokens, got {final.shape}"
    assert logits.shape == (2, model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim)
    torch.testing.assert_close(logits, final.float().mean(dim=1), rtol=0, atol=0)


def test_mlp_features_are_last_hidden_layer():
    model = VelocityMLP(3, hidden=16, depth=2, num_classes=2, time_dim=8)
    x_t, t, cond = torch.randn(4, 3), torch.rand(4), Conditioning(labels=torch.tensor([0, 1, -1, 0]))
    plain = model(x_t, t, cond)
    velocity, logits = velocity_and_logits(model, x_t, t, cond)
    assert torch.equal(plain, velocity) and logits.shape == (4, 16)
    torch.testing.assert_close(model.out(logits), velocity)
    assert torch.equal(discriminator_logits(model, x_t, t, cond), logits)


def _launch(out: Path, nproc: int, port: int) -> None:
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(ROOT / "tests" / "adversarial_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_zero3_discriminator_logits_identical_on_one_and_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    _launch(tmp_path / "one", 1, free_port())
    _launch(tmp_path / "two", 2, free_port())
    one = load_file(tmp_path / "one" / "logits-rank0.safetensors")
    for rank in range(2):
        two = load_file(tmp_path / "two" / f"logits-rank{rank}.safetensors")
        for key in ("logits", "velocity", "grad"):
            assert torch.equal(one[key], two[key]), (rank, key, (one[key] - two[key]).abs().max())
    assert one["logits"].shape == (3, 16) and one["grad"].abs().max() > 0
    # and the same as the plain (unsharded) module
    sys.path.insert(0, str(ROOT / "tests"))
    from adversarial_worker import fixed_input

    from sid_fast.models.registry import build_teacher

    bundle = build_teacher(load_config(None, ["teacher.kind=sd3", "teacher.preset=tiny"]).teacher)
    x_t, t, cond = fixed_input(bundle)
    with torch.no_grad():
        _, logits = velocity_and_logits(bundle.teacher, x_t, t, cond)
    torch.testing.assert_close(logits, one["logits"], rtol=1e-5, atol=1e-6)


def _toy_bundle() -> tuple[TeacherBundle, object]:
    mixture = ring_mixture(8, 2.0, 0.2, num_classes=4)
    torch.manual_seed(3)
    student = VelocityMLP(2, hidden=32, depth=2, num_classes=4, time_dim=16)
    return TeacherBundle(MixtureTeacher(mixture), student, LabelConditions(4), (2,), reference=mixture), mixture


def test_short_data_aided_run_on_the_toy_mixture(tmp_path):
    bundle, mixture = _toy_bundle()
    data_free = {k: v + 0.01 for k, v in bundle.student.state_dict().items()}  # "a finished data-free generator"
    save_file(data_free, tmp_path / "generator.safetensors")
    batch = 16
    per_iter = 2 * batch  # images_seen grows by 2·batch per iteration (both steps, one rank)
    config = load_config(None, [
        "method.num_steps=2", f"train.batch_size={batch}", "train.iterations=6", "train.progress=false",
        "train.resume=false", f"train.out_dir={tmp_path / 'run'}", "train.log_every=1", "optim.lr_generator=1e-3",
        "optim.lr_fake=1e-3", "method.kappa_fake_loss=1.0", "method.kappa_fake_gen=1.0", "method.kappa_teacher=2.0",
        "adversarial.enabled=true", f"adversarial.generator_warmup_images={2 * per_iter}",
        f"adversarial.adversarial_from_images={4 * per_iter}", f"adversarial.init_generator={tmp_path / 'generator.safetensors'}",
        "health.tensorboard=false"])
    trainer = build_data_aided_trainer(config, bundle, MixtureRealData(mixture, bundle.conditions, seed=1))
    generator = trainer.engine.generator
    for name, value in generator.state_dict().items():
        assert torch.equal(value, data_free[name]), f"generator not initialised from the data-free weights: {name}"
    fake_start = {k: v.clone() for k, v in trainer.engine.fake_score.state_dict().items()}
    assert all(torch.equal(fake_start[k], v) for k, v in bundle.student.state_dict().items())  # fresh copy
    history = []
    for _ in range(6):
        before = {k: v.clone() for k, v in generator.state_dict().items()}
        stats = trainer.train_step()
        moved = any(not torch.equal(before[k], v) for k, v in generator.state_dict().items())
        history.append((stats, moved))
    for i, (stats, moved) in enumerate(history):
        seen_before = i * per_iter
        assert math.isfinite(stats.loss_fake) and stats.loss_d is not None and math.isfinite(stats.loss_d)
        assert moved == (seen_before >= 2 * per_iter), (i, moved)  # no generator update during warm-up
        assert (stats.loss_generator is not None) == (seen_before >= 2 * per_iter)
        assert (stats.loss_adv is not None) == (seen_before >= 4 * per_iter), (i, stats)
        if stats.loss_adv is not None:
            assert math.isfinite(stats.loss_adv) and stats.loss_adv > 0 and math.isfinite(stats.loss_generator)
    assert not all(torch.equal(fake_start[k], v) for k, v in trainer.engine.fake_score.state_dict().items())


def test_real_latents_are_noised_with_the_fake_batch_noise_and_time():
    """§5: real x_t uses the fake batch's ε and t. With "real" samples equal to the generator's own samples and
    captions, real and fake logits must coincide exactly."""
    bundle, _ = _toy_bundle()
    config = load_config(None, ["method.num_steps=1", "train.batch_size=8", "train.progress=false",
                                "adversarial.enabled=true", "method.kappa_fake_loss=1.0", "health.tensorboard=false"])
    echo = _EchoReal()
    trainer = build_data_aided_trainer(config, bundle, echo)
    make_batch = trainer._fake_batch

    def recording_batch(steps_run):
        echo.batch = make_batch(steps_run)
        return echo.batch

    trainer._fake_batch = recording_batch
    loss = trainer.fake_score_loss(1)
    real_logits, fake_logits = trainer.last_logits
    assert torch.equal(real_logits, fake_logits) and torch.isfinite(loss)
    loss_d = discriminator_loss(real_logits, fake_logits, 2).mean()
    assert float(trainer.last_terms["loss_d"]) == pytest.approx(float(loss_d), rel=1e-6)
    assert not torch.equal(echo.batch["x_t"], echo.batch["x_g"])  # x_t really is noised


class _EchoReal:
    """Returns the generator samples and captions of the fake batch being built as the "real" batch."""

    batch: dict | None = None

    def sample_with_latents(self, batch_size):
        return self.batch["x_g"].clone(), self.batch["cond"]
