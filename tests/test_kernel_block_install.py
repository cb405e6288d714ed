"""`install_block_kernels` on tiny SD3.5 (dual attention, qk RMSNorm), FLUX and SANA (qk RMSNorm across heads)
transformers built in code: what it swaps, bit-equal output and parameter + input gradients with the `torch`
backend, the Triton kernels (interpreted) within the STYLE.md tolerance, and undo."""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest
import torch

from sid_fast import kernels
from sid_fast.config import load_config
from sid_fast.kernels import conformance
from sid_fast.kernels.blocks import REGISTRY_OPS, apply_block_kernels
from sid_fast.kernels.registry import Implementation
from sid_fast.models import tiny_components
from sid_fast.models.flux import latent_image_ids

FAMILIES = ("sd3", "flux", "sana")
EXPECTED = {  # what each tiny transformer holds, as `Class -> op`: count
    "sd3": {"AdaLayerNormContinuous -> adaln_modulation": 2, "AdaLayerNormZero -> adaln_modulation": 2,
            "RMSNorm -> rms_norm": 10, "SD35AdaLayerNormZeroX -> adaln_modulation": 1},
    "flux": {"AdaLayerNormContinuous -> adaln_modulation": 1, "AdaLayerNormZero -> adaln_modulation": 2,
             "AdaLayerNormZeroSingle -> adaln_modulation": 1, "FluxAttnProcessor -> rotary_qk": 2,
             "RMSNorm -> rms_norm": 6},
    "sana": {"RMSNorm -> rms_norm": 9, "SanaModulatedNorm -> adaln_modulation": 1},
}


def _model(family: str):
    torch.manual_seed(0)
    if family == "sd3":
        return tiny_components.transformer("sd3", "sd35-tiny")  # SD35AdaLayerNormZeroX + qk RMSNorm
    if family == "flux":
        return tiny_components.transformer("flux", "tiny")  # torch.nn.RMSNorm qk-norm, rotary, guidance embed
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=2,
                                  qk_norm="rms_norm_across_heads").eval()


def _inputs(family: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    if family == "sd3":
        return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=gen),
                    encoder_hidden_states=torch.randn(2, 8, 32, generator=gen),
                    pooled_projections=torch.randn(2, 32, generator=gen), timestep=torch.tensor([500.0, 250.0]))
    if family == "flux":  # a 8x8 latent packed 2x2: 16 tokens of 64
        return dict(hidden_states=torch.randn(2, 16, 64, generator=gen),
                    encoder_hidden_states=torch.randn(2, 8, 32, generator=gen),
                    pooled_projections=torch.randn(2, 32, generator=gen), timestep=torch.tensor([0.5, 0.25]),
                    guidance=torch.tensor([3.5, 3.5]), img_ids=latent_image_ids(8, 8), txt_ids=torch.zeros(8, 3))
    return dict(hidden_states=torch.randn(2, 8, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                timestep=torch.tensor([500.0, 250.0]))


def _output_and_gradients(model, family: str) -> dict[str, torch.Tensor]:
    """The output, the latent and text input gradients and every parameter gradient of Σ w · out."""
    inputs = _inputs(family)
    leaves = {name: inputs[name].requires_grad_() for name in ("hidden_states", "encoder_hidden_states")}
    out = model(**inputs).sample
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out * weights).sum(), [*leaves.values(), *params.values()], allow_unused=True)
    found = {"out": out.detach()}
    for name, grad in zip([*leaves, *params], grads, strict=True):
        if grad is not None:
            found[f"d/d{name}"] = grad
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_backend_is_bit_equal_and_undoes(family):
    model = _model(family)
    keys = list(model.state_dict())
    want = _output_and_gradients(model, family)
    report = kernels.install_block_kernels(model, backend="torch")
    assert dict(report.swapped) == EXPECTED[family], str(report)
    assert list(model.state_dict()) == keys  # same modules, same parameters: checkpoints load either way
    got = _output_and_gradients(model, family)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    twin = copy.deepcopy(model)  # an EMA copy of an installed generator keeps the fused classes
    assert sum(type(m).__name__.startswith("Fused") for m in twin.modules()) == sum(
        type(m).__name__.startswith("Fused") for m in model.modules()) > 0
    assert kernels.uninstall_block_kernels(model) == report.total
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    restored = _output_and_gradients(model, family)
    assert all(torch.equal(restored[name], want[name]) for name in want)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_within_tolerance(family, monkeypatch):
    """fp32 model, so the reference's own error against fp32 gold is 0 and the STYLE.md rule leaves the
    relative atol: max|triton − torch| ≤ 2e-5 · max|torch| for the output and every gradient."""
    model = _model(family)
    want = _output_and_gradients(model, family)
    calls = {}
    for op in REGISTRY_OPS:  # count the kernel launches: no silent fallback to the reference
        impl = kernels.get_op(op).implementations["triton"]

        def counted(*args, _forward=impl.forward, _op=op):
            calls[_op] = calls.get(_op, 0) + 1
            return _forward(*args)

        monkeypatch.setitem(kernels.get_op(op).implementations, "triton",
                            Implementation(counted, impl.backward, impl.eligible))
    kernels.install_block_kernels(model, backend="triton")
    got = _output_and_gradients(model, family)
    expected_ops = {"adaln_modulation", "weighted_rms_norm"} | ({"rotary_qk"} if family == "flux" else set())
    assert set(calls) == expected_ops, calls
    for name in want:
        error = (got[name] - want[name]).abs().max().item()
        assert error <= conformance.ATOL_REL * want[name].abs().max().item() + 1e-7, (name, error)


def test_unweighted_rms_norm_and_skips_are_reported():
    from diffusers.models.normalization import RMSNorm

    model = torch.nn.Sequential(RMSNorm(12, eps=1e-6, elementwise_affine=False),
                                RMSNorm(12, eps=1e-5, elementwise_affine=True, bias=True),
                                torch.nn.RMSNorm(12, eps=None, elementwise_affine=False))
    x = torch.randn(2, 3, 12)
    want = model(x)
    report = kernels.install_block_kernels(model, backend="torch")
    assert report.total == 2 and report.skipped == {"1": "RMSNorm: RMSNorm with bias"}
    assert "left as is: 1 (RMSNorm: RMSNorm with bias)" in str(report)
    assert torch.equal(model(x), want)


def test_ops_subset_and_bad_arguments():
    model = _model("flux")
    report = kernels.install_block_kernels(model, backend="torch", ops=["rotary_qk"])
    assert dict(report.swapped) == {"FluxAttnProcessor -> rotary_qk": 2}
    with pytest.raises(ValueError, match="inline"):
        kernels.install_block_kernels(model, ops=["gated_residual"])
    with pytest.raises(ValueError, match="unknown block op"):
        kernels.install_block_kernels(model, ops=["layer_norm"])
    with pytest.raises(ValueError, match="unknown block kernel backend 'cpp'"):
        kernels.install_block_kernels(model, backend="cpp")


def test_config_hook_installs_and_names_the_field():
    assert load_config().kernels.block_backend == "torch"
    sd3, flux = _model("sd3"), _model("flux")
    wrapper = torch.nn.Sequential(flux)  # an adapter holding the diffusers model
    assert apply_block_kernels([sd3, wrapper], "torch") == []
    assert not any(type(m).__name__.startswith("Fused") for m in sd3.modules())
    reports = apply_block_kernels([sd3, wrapper], "triton")
    assert [r.total for r in reports] == [15, 12]
    with pytest.raises(ValueError, match="kernels.block_backend"):
        apply_block_kernels([sd3], "cpp")
    with pytest.raises(ValueError, match="kernels.block_backend"):
        load_config(overrides=["kernels.block_backend=not a name"])


def test_trainer_hook_installs_on_teacher_fake_score_and_generator(tmp_path, caplog):
    """`kernels.block_backend=triton` in a SiD run on a tiny FLUX: every network is switched, and the first
    iteration's losses match the run without the hook."""
    from sid_fast.api import distill
    from sid_fast.config import KernelConfig, MethodConfig, SiDConfig, TeacherConfig, TrainConfig
    from sid_fast.models.registry import build_teacher

    losses = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        config = SiDConfig(teacher=TeacherConfig(kind="flux", preset="tiny"),
                           method=MethodConfig(num_steps=2, kappa_fake_loss=4.5, kappa_fake_gen=4.5, kappa_teacher=4.5),
                           train=TrainConfig(iterations=1, batch_size=2, out_dir=str(tmp_path / backend),
                                             progress=False, log_every=1),
                           kernels=KernelConfig(block_backend=backend))
        bundle = build_teacher(config.teacher)
        with caplog.at_level("INFO", logger="sid_fast.kernels"):
            result = distill(bundle.teacher, bundle.conditions, bundle.sample_shape, config)
        losses[backend] = torch.tensor([result.history[0]["loss_fake"], result.history[0]["loss_generator"]])
        fused = sum(type(m).__name__.startswith("Fused") for m in result.generator.modules())
        assert fused == (10 if backend == "triton" else 0)
    assert caplog.text.count("block kernels (triton): 12 swapped") == 3  # teacher, fake score, generator
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=2e-3, atol=1e-4)
