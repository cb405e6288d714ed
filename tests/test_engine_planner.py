"""The memory planner against DeepSpeed's own ZeRO-3 estimator, its scaling laws, the LoRA fake score's adapter sizes
counted from the diffusers models, the fewest-GPUs answer, `sid-fast plan` and the launchers' LoRA dry run."""

from __future__ import annotations

import dataclasses

import pytest

from sid_fast.cli import main
from sid_fast.config import load_config
from sid_fast.engine.planner import (
    GIB,
    MODELS,
    PlanOptions,
    deepspeed_estimate,
    describe_min_gpus,
    min_gpus,
    plan,
    spec_from_module,
)
from sid_fast.models.mlp import VelocityMLP

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("key", sorted(MODELS))
@pytest.mark.parametrize("gpus_per_node,nodes,offload", [(8, 1, False), (8, 2, False), (8, 1, True), (4, 3, True)])
def test_trainable_states_match_deepspeed_estimator(key, gpus_per_node, nodes, offload):
    spec = MODELS[key]
    ours = plan(spec, PlanOptions(gpus_per_node=gpus_per_node, nodes=nodes, offload_optimizer=offload))
    theirs = deepspeed_estimate(spec.params, spec.largest_layer, gpus_per_node, nodes, offload)
    assert ours["generator_states"] == pytest.approx(theirs, rel=1e-6)
    assert ours["fake_score_states"] == pytest.approx(theirs, rel=1e-6)


def test_spec_from_module_counts_like_deepspeed():
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = VelocityMLP(5, hidden=37, depth=3, num_classes=3)
    spec = spec_from_module(model, "mlp", hidden=37, blocks=3, text_tokens=0, latent_factor=1)
    assert (spec.params, spec.largest_layer) == model_to_params(model)


def test_scaling_laws_and_verdicts():
    flux = MODELS["flux-dev"]
    base = PlanOptions(resolution=1024)
    plain, ckpt = plan(flux, base), plan(flux, dataclasses.replace(base, activation_checkpointing=True))
    assert not plain["fits"] and ckpt["fits"]  # FLUX at 1024 px needs activation checkpointing on 8×80 GB
    assert ckpt["activations"] < plain["activations"] / 10
    double = plan(flux, dataclasses.replace(base, micro_batch=2))
    assert double["activations"] == pytest.approx(2 * plain["activations"])
    two_nodes = plan(flux, dataclasses.replace(base, nodes=2))
    assert two_nodes["teacher_params"] == pytest.approx(plain["teacher_params"] / 2)
    lora = plan(flux, dataclasses.replace(base, lora_fake_rank=64))
    assert lora["fake_score_states"] < plain["fake_score_states"] / 20
    no_cfg = plan(flux, dataclasses.replace(base, cfg=False))
    assert no_cfg["activations"] == pytest.approx(plain["activations"] * 3 / 5)  # 1 + 1 + 1 passes instead of 1 + 2 + 2
    small = plan(MODELS["sd3-medium"], PlanOptions(resolution=512))
    assert small["fits"] and small["tokens"] == 32 * 32 + 333


def test_plan_command(capsys):
    assert main(["plan", "--teacher", "sd35-large", "--resolution", "1024", "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    expected = plan(MODELS["sd35-large"], PlanOptions(resolution=1024, activation_checkpointing=True))
    assert f"{expected['total'] / GIB:.1f}" in out and "SD3.5-Large" in out and "fits" in out
    assert main(["plan", "--micro-batch", "0"]) == 2
    assert "--micro-batch must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("override,field", [
    ("engine.kind=fsdp", "engine.kind"), ("engine.zero_stage=2", "engine.zero_stage"),
    ("engine.optimizer=sgd", "engine.optimizer"), ("engine.ds_config=/nonexistent.json", "engine.ds_config"),
    ("engine.persistence_threshold=-1", "engine.persistence_threshold"),
])
def test_engine_config_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])


# ---------------------------------------------------------------- the LoRA fake score and the fewest GPUs

PUBLIC_CONFIGS = {  # the released transformers' diffusers configs (what `from_pretrained` would build)
    "sd3-medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)),
    "sd35-medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "sd35-large": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                   attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")),
    "flux-dev": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "sana-1.6b": ("SanaTransformer2DModel", dict(in_channels=32, out_channels=32, num_attention_heads=70,
                  attention_head_dim=32, num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
                  cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1)),
}


def test_lora_sizes_are_counted_from_the_diffusers_models():
    """ModelSpec's counts are those of each released transformer built on the meta device from its public config
    (no weights): parameters, largest layer and floating buffers, and lora_per_rank = what make_lora_fake_score adds
    per unit of rank."""
    import diffusers
    import torch

    from sid_fast.models.lora import lora_params_per_rank

    for key, (cls, config) in PUBLIC_CONFIGS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**config)
        assert lora_params_per_rank(model) == MODELS[key].lora_per_rank, key
        spec = spec_from_module(model, key, hidden=0, blocks=0, text_tokens=0, latent_factor=1)
        assert spec.params == pytest.approx(MODELS[key].params, rel=1e-4), key
        assert spec.largest_layer == pytest.approx(MODELS[key].largest_layer, rel=1e-3), key
        assert spec.buffers == pytest.approx(MODELS[key].buffers, rel=1e-3, abs=1), key


def test_lora_fake_score_costs_its_adapters_only():
    flux = MODELS["flux-dev"]
    options = PlanOptions(resolution=1024, activation_checkpointing=True)
    full, lora = plan(flux, options), plan(flux, dataclasses.replace(options, lora_fake_rank=64))
    adapters = 64 * flux.lora_per_rank
    assert lora["fake_score_states"] == pytest.approx(18 * adapters / 8)  # bf16: 18 bytes per adapter parameter
    assert lora["teacher_params"] == full["teacher_params"]  # the one base, shared
    assert lora["activations"] == full["activations"]  # the fake score still runs the whole network
    assert full["total"] - lora["total"] == pytest.approx(full["fake_score_states"] - lora["fake_score_states"])
    fp32 = plan(flux, dataclasses.replace(options, lora_fake_rank=64, precision="fp32"))
    assert fp32["fake_score_states"] == pytest.approx(20 * adapters / 8)  # 4 + 4 + 4 + 8, as a CPU run measures


def test_min_gpus_flux_lora_fits_four_80gb_gpus():
    """The fewest 80 GB GPUs: FLUX.1-dev at 1024 px, micro-batch 1, activation checkpointing: 4 with the LoRA fake
    score of rank 64, 7 with three full copies; without checkpointing no count suffices (activations alone)."""
    flux = MODELS["flux-dev"]
    options = PlanOptions(resolution=1024, activation_checkpointing=True)
    for rank, expected in ((64, 4), (0, 7)):
        gpus, result = min_gpus(flux, dataclasses.replace(options, lora_fake_rank=rank))
        assert gpus == expected and result["fits"]
        fewer = plan(flux, dataclasses.replace(options, lora_fake_rank=rank, gpus_per_node=gpus - 1))
        assert not fewer["fits"]
    assert min_gpus(flux, dataclasses.replace(options, activation_checkpointing=False)) is None
    assert describe_min_gpus(min_gpus(MODELS["sd35-large"], PlanOptions(resolution=1024))).startswith("25 (4 nodes")


def test_plan_command_min_gpus_and_lora(capsys):
    assert main(["plan", "--teacher", "flux-dev", "--min-gpus", "--fake-lora-rank", "64"]) == 0
    out = capsys.readouterr().out
    assert "| FLUX.1-dev | 1024 | LoRA r=64, shared base | 158.8 (OOM) | none" in out
    assert "| 40.8 | 4 (1 node of 8, 68.7 GiB) |" in out and "| 65.8 | 7 (1 node of 8, 73.3 GiB) |" in out
    assert main(["plan", "--teacher", "flux-dev", "--activation-checkpointing", "--lora-fake-rank", "64"]) == 0
    assert "ckpt+lora64" in capsys.readouterr().out  # the old spelling still works
    assert main(["plan", "--fake-lora-rank", "-1"]) == 2
    assert "--fake-lora-rank must be >= 0" in capsys.readouterr().err


def test_launcher_dry_run_with_lora_fake_score(capsys):
    """launchers/flux_large.py --dry-run --teacher.fake_lora_rank=64 on 4 GPUs: the plan with the shared base."""
    import sys
    from pathlib import Path

    launchers = Path(__file__).resolve().parents[1] / "launchers"
    sys.path.insert(0, str(launchers))
    try:
        import common
    finally:
        sys.path.remove(str(launchers))
    assert common.main("flux_large", lambda: MODELS["flux-dev"],
                       ["--dry-run", "--gpus-per-node", "4", "--teacher.fake_lora_rank=64"]) == 0
    out = capsys.readouterr().out
    assert "fake_lora_rank: 64" in out and "ckpt+lora64" in out and "4×80 GB: fits" in out
    assert "fewest 80 GB GPUs for this config: 4 (1 node of 4" in out


def test_an_ema_costs_an_fp32_partition_of_the_generator(capsys):
    """`--ema` (train.ema_decay > 0): the generator's fp32 EMA, partitioned over the GPUs like its weights; the fake
    score (full or LoRA) does not have one."""
    flux = MODELS["flux-dev"]
    options = PlanOptions(resolution=1024, activation_checkpointing=True)
    for rank in (0, 64):
        without = plan(flux, dataclasses.replace(options, lora_fake_rank=rank))
        with_ema = plan(flux, dataclasses.replace(options, lora_fake_rank=rank, ema=True))
        assert with_ema["generator_states"] - without["generator_states"] == pytest.approx(4 * flux.params / 8)
        assert with_ema["fake_score_states"] == without["fake_score_states"]
        assert with_ema["total"] - without["total"] == pytest.approx(4 * flux.params / 8)
    assert main(["plan", "--teacher", "flux-dev", "--activation-checkpointing", "--ema"]) == 0
    assert "ckpt+ema" in capsys.readouterr().out
