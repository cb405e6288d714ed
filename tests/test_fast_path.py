"""The trainer's fast path (issue 13, docs/performance.md): no host sync per iteration, regional torch.compile
of the DiT blocks with no graph break and eager's losses, the Adam implementations, a bf16 frozen teacher under
autocast, and activation checkpointing chosen per network in the local engine."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from sid_fast.config import load_config
from sid_fast.engine.build import build_engine
from sid_fast.models.registry import build_teacher
from sid_fast.trainer import SiDTrainer

ROOTS = tuple(str(Path(__file__).resolve().parents[1] / part) for part in ("sid_fast", "kernels"))
SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
HOST_ONLY = {"steps_for_iteration"}
"""Functions whose reads are of CPU tensors on every device (K' comes from a CPU generator shared by all ranks)."""


def _trainer(tmp_path, family="sd3", *overrides):
    config = load_config(None, [f"teacher.kind={family}", "teacher.preset=tiny", "method.num_steps=2",
                                "method.kappa_teacher=3", "method.kappa_fake_gen=3", "method.kappa_fake_loss=3",
                                "train.batch_size=2", "train.progress=false", "train.resume=false",
                                "health.tensorboard=false", f"train.out_dir={tmp_path}", "optim.lr_generator=1e-4",
                                "optim.lr_fake=1e-4", *overrides])
    torch.manual_seed(0)
    bundle = build_teacher(config.teacher)
    return SiDTrainer(config, build_engine(config, bundle), bundle.conditions, bundle.sample_shape)


class SyncCounter:
    """Counts the calls that read a tensor on the host (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, ...) made
    from sid_fast's own code: each is a device sync on an accelerator. Torch internals are not counted."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in SYNCS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(ROOTS) and caller.f_code.co_name not in HOST_ONLY:
                self.calls.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)
        return counted


def test_an_iteration_reads_nothing_back_to_the_host_until_the_log_line(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "sd3", "health.defer_checks=true", "method.num_steps=4")
    trainer._train_step()  # first iteration: lazy set-up (uncond on the device, optimizer state) may read
    counter = SyncCounter(monkeypatch)
    lazy = [trainer._train_step() for _ in range(2)]
    assert counter.calls == [], counter.calls
    trainer.guard.flush()
    records = [stats.resolved() for stats in lazy]
    assert len(counter.calls) <= 2 * len(records), counter.calls  # one transfer per read, not one per scalar
    assert all(isinstance(r.loss_fake, float) and isinstance(r.grad_norm_generator, float) for r in records)


def test_immediate_checks_are_what_the_counter_sees(tmp_path, monkeypatch):
    """The counter is not blind: with health.defer_checks=false every watched tensor and loss is read per update."""
    trainer = _trainer(tmp_path, "sd3", "health.defer_checks=false")
    trainer._train_step()
    counter = SyncCounter(monkeypatch)
    trainer._train_step()
    assert len(counter.calls) >= 6, counter.calls  # x_g twice, κ1 velocity, teacher + fake velocities, two losses


@pytest.mark.parametrize("family", ["sd3", "flux", "sana"])
def test_regional_compile_has_no_graph_break_and_eager_losses(tmp_path, family):
    import torch._dynamo
    from torch._dynamo.utils import counters

    def losses(compiled: bool):
        torch._dynamo.reset()
        counters.clear()
        # SD3 through AOTAutograd too; FLUX and SANA through dynamo's capture only (graph breaks are dynamo's)
        backend = "aot_eager" if family == "sd3" else "eager"
        overrides = ["kernels.compile=true", f"kernels.compile_backend={backend}"] if compiled else []
        trainer = _trainer(tmp_path / str(compiled), family, "method.num_steps=1", *overrides)
        out = [trainer.train_step()]  # one iteration traces every variant (train, no-grad, input-grad)
        breaks = dict(counters["graph_break"])
        frames = counters["stats"]["unique_graphs"]
        return [v for s in out for v in (s.loss_fake, s.loss_generator)], breaks, frames

    eager, _, _ = losses(False)
    compiled, breaks, graphs = losses(True)
    assert breaks == {}, f"graph breaks inside the {family} blocks: {breaks}"
    assert graphs > 0, "nothing was compiled"
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_repeated_blocks_found_per_family():
    from sid_fast.kernels.regional_compile import repeated_blocks
    from sid_fast.models import tiny_components

    expected = {"sd3": {"JointTransformerBlock"}, "flux": {"FluxTransformerBlock", "FluxSingleTransformerBlock"},
                "sana": {"SanaTransformerBlock"}}
    for family, names in expected.items():
        model = tiny_components.transformer(family, "tiny")
        assert {type(b).__name__ for b in repeated_blocks(model)} == names, family


def test_adam_implementations_agree(tmp_path):
    weights = {}
    for implementation in ("single", "foreach", "fused"):
        trainer = _trainer(tmp_path / implementation, "sd3", f"optim.implementation={implementation}")
        for _ in range(2):
            trainer.train_step()
        weights[implementation] = trainer.engine.generator_state_dict(ema=False)
    for implementation in ("foreach", "fused"):
        for key, value in weights["single"].items():
            torch.testing.assert_close(weights[implementation][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_frozen_teacher_under_autocast_trains_fp32_students(tmp_path):
    trainer = _trainer(tmp_path, "sd3", "teacher.frozen_dtype=bfloat16", "train.autocast=bfloat16")
    engine = trainer.engine
    assert {p.dtype for p in engine.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.generator.parameters()} == {torch.float32}
    before = {k: v.clone() for k, v in engine.generator.state_dict().items()}
    stats = [trainer.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor([s.loss_fake, s.loss_generator])).all() for s in stats)
    assert any(not torch.equal(before[k], v) for k, v in engine.generator.state_dict().items())
    assert all(p.grad is None for p in engine.teacher.parameters())


def test_activation_checkpointing_per_network_keeps_losses_and_freezes_the_fake_score(tmp_path):
    first = _trainer(tmp_path / "a", "sd3").train_step()
    plain = [first.loss_fake, first.loss_generator]
    trainer = _trainer(tmp_path / "b", "sd3", "engine.activation_checkpointing=true",
                       "engine.checkpoint_networks=teacher,fake_score")
    blocks = [m for m in trainer.engine.fake_score.modules() if hasattr(m, "gradient_checkpointing")]
    assert blocks and all(m.gradient_checkpointing for m in blocks)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in trainer.engine.generator.modules())
    stats = trainer.train_step()
    assert [stats.loss_fake, stats.loss_generator] == pytest.approx(plain, rel=1e-5)
    # the generator step backpropagates through the checkpointed fake score: its weights get no gradient
    assert all(p.grad is None for p in trainer.engine.fake_score.parameters())


def test_checkpoint_networks_names_are_checked():
    with pytest.raises(ValueError, match="engine.checkpoint_networks"):
        load_config(None, ["engine.checkpoint_networks=teacher,student"])
    with pytest.raises(ValueError, match="engine.checkpoint_networks"):
        load_config(None, ["engine.checkpoint_networks=auto,teacher"])
    with pytest.raises(ValueError, match="engine.memory_gib"):
        load_config(None, ["engine.memory_gib=-1"])


def test_the_planner_checkpoints_the_fewest_recomputed_passes_that_fit():
    from sid_fast.engine.planner import activation_parts, choose_checkpointed

    geometry = dict(hidden=1536, blocks=24, tokens=4429, micro_batch=2)
    full = sum(activation_parts(**geometry).values())
    parts = activation_parts(**geometry, checkpointed=("generator",))
    assert parts["teacher"] == parts["fake_score"] == pytest.approx(2 * parts["generator"] * 34 / (2 + 34 / 24))
    assert choose_checkpointed(**geometry, budget=full) == ((), full)  # fits: nothing recomputed
    chosen, predicted = choose_checkpointed(**geometry, budget=full - 1)
    assert chosen == ("generator",) and predicted == sum(parts.values()) < full  # one pass recomputed is enough
    two = sum(activation_parts(**geometry, checkpointed=("teacher",)).values())
    assert choose_checkpointed(**geometry, budget=predicted - 1) == (("teacher",), two)  # 2 passes: teacher or fake
    everything = sum(activation_parts(**geometry, checkpointed=("generator", "teacher", "fake_score")).values())
    assert choose_checkpointed(**geometry, budget=0)[0] == ("generator", "teacher", "fake_score")
    assert choose_checkpointed(**geometry, budget=everything)[1] == everything
    no_cfg = sum(activation_parts(**geometry, cfg=False).values())
    assert no_cfg == full * 3 / 5 and choose_checkpointed(**geometry, budget=full - 1, cfg=False)[0] == ()
    assert choose_checkpointed(**geometry, budget=no_cfg - 1, cfg=False)[0] == ("generator",)


def test_auto_checkpointing_follows_the_memory_budget(tmp_path, capsys):
    from sid_fast.engine import build, planner

    assert _trainer(tmp_path / "cpu", "sd3", "engine.activation_checkpointing=true",
                    "engine.checkpoint_networks=auto").engine.checkpointed == ()  # CPU, no engine.memory_gib
    config = load_config(None, ["teacher.kind=sd3", "teacher.preset=tiny", "method.kappa_teacher=3",
                                "method.kappa_fake_gen=3", "train.batch_size=2"])
    bundle = build_teacher(config.teacher)
    hidden, blocks, patch = build.transformer_geometry(bundle.teacher)
    tokens = (bundle.sample_shape[-2] // patch) * (bundle.sample_shape[-1] // patch) + build.text_tokens(config)
    full = sum(planner.activation_parts(hidden, blocks, tokens, 2, 4).values())
    copies = tuple(copy.deepcopy(bundle.teacher).requires_grad_(True) for _ in range(2))  # fake score, generator
    states = build._model_state_bytes("local", bundle.teacher.requires_grad_(False), copies, 1, False)
    memory_gib = (states + planner.PlanOptions.overhead_gib * planner.GIB + full - 1) / planner.GIB
    trainer = _trainer(tmp_path / "tight", "sd3", "engine.activation_checkpointing=true", "engine.checkpoint_networks=auto",
                       f"engine.memory_gib={memory_gib}")
    assert trainer.engine.checkpointed == ("generator",)
    assert "activation checkpointing auto: generator" in capsys.readouterr().out
    blocks_of = [m for m in trainer.engine.generator.modules() if hasattr(m, "gradient_checkpointing")]
    assert blocks_of and all(m.gradient_checkpointing for m in blocks_of)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in trainer.engine.teacher.modules())
    stats = trainer.train_step()
    assert torch.isfinite(torch.tensor([stats.loss_fake, stats.loss_generator])).all()
    roomy = _trainer(tmp_path / "roomy", "sd3", "engine.activation_checkpointing=true", "engine.checkpoint_networks=auto",
                     f"engine.memory_gib={memory_gib + 1}")
    assert roomy.engine.checkpointed == ()


def test_auto_checkpointing_counts_the_ema_and_the_autocast_copies():
    """The model states the `auto` budget subtracts: weights, gradients and Adam states of what trains, the frozen
    teacher once, plus the generator's fp32 EMA (ZeRO-3: its partition with engine.sharded_ema) and, under 16-bit
    autocast on the local engine, the 16-bit copies of the fp32 trained weights that the backward keeps."""
    from sid_fast.engine.build import _model_state_bytes

    teacher = torch.nn.Linear(10, 10).to(torch.bfloat16).requires_grad_(False)  # 110 parameters, 2 bytes each
    fake, generator = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)
    base = _model_state_bytes("local", teacher, (fake, generator), 1, False)
    assert base == 2 * 110 + 4 * (4 * 220)
    assert _model_state_bytes("local", teacher, (fake, generator), 1, False, ema=True) == base + 4 * 110
    assert _model_state_bytes("local", teacher, (fake, generator), 1, False, autocast16=True) == base + 2 * 220
    zero3 = _model_state_bytes("deepspeed", teacher, (fake, generator), 4, True)
    assert _model_state_bytes("deepspeed", teacher, (fake, generator), 4, True, ema=True) == zero3 + 4 * 110 / 4
    assert _model_state_bytes("deepspeed", teacher, (fake, generator), 4, True, ema=True,
                              sharded_ema=False) == zero3 + 4 * 110


def test_auto_checkpointing_needs_a_transformer_config():
    from types import SimpleNamespace

    from sid_fast.engine.build import resolve_checkpointed

    config = load_config(None, ["teacher.kind=mixture", "engine.activation_checkpointing=true",
                                "engine.checkpoint_networks=auto", "engine.memory_gib=16"])
    bundle = SimpleNamespace(teacher=torch.nn.Linear(4, 4), sample_shape=(2,))  # no diffusers config to read
    with pytest.raises(ValueError, match="engine.checkpoint_networks: `auto` estimates .* the mixture teacher"):
        resolve_checkpointed(config, bundle, torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def test_auto_loss_backend_resolves_for_the_device_and_runs(tmp_path):
    from sid_fast.kernels import backends

    trainer = _trainer(tmp_path, "sd3", "kernels.loss_backend=auto")
    assert trainer.loss_backend != "auto" and trainer.loss_backend in backends("cfg_sid_generator_loss")
    stats = trainer.train_step()
    assert torch.isfinite(torch.tensor([stats.loss_fake, stats.loss_generator])).all()
