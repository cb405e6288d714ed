"""The analytic DiT FLOP formulas (sid_fast.models.flops) against torch's FlopCounterMode: tiny SD3, SD3.5, FLUX and
SANA models run on the CPU (forward, trained backward, input-only backward, checkpointed recomputation), and the
released SD3.5-Medium/Large, FLUX.1-dev and SANA-1.6B configs at 1024 px run on the meta device (no memory, no
compute: FlopCounterMode reads shapes)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sid_fast.models import tiny_components
from sid_fast.models.flops import (
    counted_iteration_flops,
    dit_forward_flops,
    family_of,
    flop_counter_mode,
    image_tokens,
    sid_iteration_flops,
)
from sid_fast.models.flux import latent_image_ids, pack_latents

TINY = [("sd3", "tiny"), ("sd3", "sd35-tiny"), ("flux", "tiny"), ("flux", "schnell-tiny"), ("sana", "tiny"),
        ("sana", "sprint-tiny")]


def _sid_step_module():
    """benchmarks/gpu/sid_step.py, where the released configs are written with their sources."""
    if "sid_step" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "sid_step.py"
        spec = importlib.util.spec_from_file_location("sid_step", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sid_step"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["sid_step"]


def _inputs(model, family: str, batch: int, latent: int, text_tokens: int, x_grad: bool = False, device=None):
    """Keyword inputs of one transformer call (latent x of (batch, C, latent, latent))."""
    config = model.config
    make = {"device": device} if device is not None else {}
    channels = 16 if family != "sana" else config.in_channels
    x = torch.randn(batch, channels, latent, latent, requires_grad=x_grad, **make)
    if family == "sd3":
        return dict(hidden_states=x, timestep=torch.rand(batch, **make) * 1000,
                    encoder_hidden_states=torch.randn(batch, text_tokens, config.joint_attention_dim, **make),
                    pooled_projections=torch.randn(batch, config.pooled_projection_dim, **make))
    if family == "flux":
        guidance = torch.full((batch,), 3.5, **make) if config.guidance_embeds else None
        return dict(hidden_states=pack_latents(x), timestep=torch.rand(batch, **make), guidance=guidance,
                    pooled_projections=torch.randn(batch, config.pooled_projection_dim, **make),
                    encoder_hidden_states=torch.randn(batch, text_tokens, config.joint_attention_dim, **make),
                    txt_ids=torch.zeros(text_tokens, 3, **make), img_ids=latent_image_ids(latent, latent, **make))
    guidance = torch.full((batch,), 4.5, **make) if config.guidance_embeds else None
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, text_tokens, config.caption_channels, **make),
                encoder_attention_mask=torch.ones(batch, text_tokens, **make), timestep=torch.rand(batch, **make) * 1000,
                guidance=guidance)


def _tiny(family: str, preset: str):
    spec = tiny_components.preset_spec(family, preset)
    model = tiny_components.seeded(lambda: tiny_components.transformer(family, preset), 0)
    return model, spec["latent"], spec["seq"]


@pytest.mark.parametrize("family,preset", TINY)
def test_forward_matches_flop_counter(family, preset):
    model, latent, tokens = _tiny(family, preset)
    batch = 3
    with torch.no_grad(), flop_counter_mode() as counter:
        model(**_inputs(model, family, batch, latent, tokens), return_dict=False)
    analytic = dit_forward_flops(model.config, batch, image_tokens(model.config, latent), tokens)
    assert family_of(model.config) == family
    assert analytic.total == pytest.approx(counter.get_total_flops(), rel=1e-3)  # exact: same products counted


@pytest.mark.parametrize("family,preset", [("sd3", "sd35-tiny"), ("flux", "tiny"), ("sana", "tiny")])
@pytest.mark.parametrize("mode", ["trained", "input", "input+checkpointing"])
def test_backward_buckets_match_flop_counter(family, preset, mode):
    """Trained backward (weights and inputs), input-gradient-only backward through a frozen network (§3), and the
    recomputed blocks of diffusers gradient checkpointing, each as FlopCounterMode counts them."""
    model, latent, tokens = _tiny(family, preset)
    if mode.endswith("checkpointing"):
        model.enable_gradient_checkpointing()
    model.train().requires_grad_(mode == "trained")
    batch = 2
    inputs = _inputs(model, family, batch, latent, tokens, x_grad=mode != "trained")
    with flop_counter_mode() as counter:
        model(**inputs, return_dict=False)[0].square().sum().backward()
    f = dit_forward_flops(model.config, batch, image_tokens(model.config, latent), tokens)
    expected = f.total + (f.trained_backward() if mode == "trained" else f.input_backward())
    expected += f.blocks_total if mode.endswith("checkpointing") else 0.0
    assert expected == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_grouped_conv_backward_is_counted_per_group():
    """torch's own formula counts a depthwise conv's weight gradient C times over; flop_counter_mode does not."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
    x = torch.randn(2, 32, 8, 8)
    with flop_counter_mode() as counter:
        conv(x).sum().backward()
    forward = 2 * 2 * 32 * 8 * 8 * 9  # 2 FLOPs per multiply-add, one input channel per output channel
    assert counter.get_total_flops() == forward * 2  # forward + weight gradient (x needs no gradient)


@pytest.mark.parametrize("name", ["SD35_MEDIUM", "SD35_LARGE", "FLUX_DEV", "SANA_1600M_1024"])
def test_released_configs_at_1024px_on_meta_device(name):
    """The benchmark's real configs, full size, counted by FlopCounterMode on the meta device (shapes only)."""
    import diffusers

    sid_step = _sid_step_module()
    config = getattr(sid_step, name)
    family = {"SD35": "sd3", "FLUX": "flux", "SANA": "sana"}[name.split("_")[0]]
    cls = getattr(diffusers, sid_step.CLASSES[family])
    with torch.device("meta"):
        model = cls(**config)
    tokens = sid_step.TEXT[family][0]
    latent = 32 if family == "sana" else 128  # 1024 px: DC-AE f32, or the 8x VAE
    with torch.device("meta"):
        inputs = _inputs(model, family, 2, latent, tokens)
    inputs = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    with torch.no_grad(), flop_counter_mode() as counter:
        model(**inputs, return_dict=False)
    analytic = dit_forward_flops(model.config, 2, image_tokens(model.config, latent), tokens)
    assert analytic.total == pytest.approx(counter.get_total_flops(), rel=1e-3)
    per_sample = analytic.total / 2 / 1e12  # TFLOP per sample and forward, to keep the docs' numbers honest
    assert {"sd3": 5.0, "flux": 50.0, "sana": 2.0}[family] < per_sample < {"sd3": 40.0, "flux": 100.0, "sana": 5.0}[family]


def test_depth_extrapolation_equals_the_full_model():
    sid_step = _sid_step_module()
    full = dit_forward_flops(sid_step.FLUX_DEV, 2, 4096, 512)
    cut = dit_forward_flops({**sid_step.FLUX_DEV, "num_layers": 4, "num_single_layers": 8}, 2, 4096, 512)
    assert cut.at_depth({"double": 19, "single": 38}).total == pytest.approx(full.total, rel=1e-12)
    medium = dit_forward_flops(sid_step.SD35_MEDIUM, 1, 4096, 333)
    assert medium.counts == {"joint_dual": 13, "joint": 10, "joint_last": 1}


def test_sid_iteration_rules():
    """Forward F per call; CFG doubles a call; trained backward 2F; input-only backward 1F (module docstring)."""
    f = 1.0
    for k in (1, 2, 3, 4):
        assert sid_iteration_flops(f, f, f, k, 2, 2, 2)["total"] == 2 * k + 16  # κ ∉ {0, 1} everywhere
        assert sid_iteration_flops(f, f, f, k, 1, 1, 1)["total"] == 2 * k + 9  # FLUX `embed`: one pass each
    model, latent, tokens = _tiny("sd3", "tiny")
    forward = dit_forward_flops(model.config, 2, image_tokens(model.config, latent), tokens)
    counted = counted_iteration_flops(forward, forward, forward, 3, 2, 2, 2)
    rules = sid_iteration_flops(forward.total, forward.total, forward.total, 3, 2, 2, 2)
    assert counted["total"] > rules["total"]  # the attention backward recomputes its scores
