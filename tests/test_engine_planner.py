"""The memory planner against DeepSpeed's own ZeRO-3 estimator, its scaling laws, and `sid-fast plan`."""

from __future__ import annotations

import dataclasses

import pytest

from sid_fast.cli import main
from sid_fast.config import load_config
from sid_fast.engine.planner import GIB, MODELS, PlanOptions, deepspeed_estimate, plan, spec_from_module
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
