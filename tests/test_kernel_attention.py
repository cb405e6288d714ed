"""Attention backend choice through diffusers' mechanism (kernels/attention.py): SDPA on the CPU, fallback with a
log line for unavailable backends, and the input-gradient backward of a frozen network (§3)."""

import pytest
import torch

from sid_fast.kernels.attention import (
    apply_attention_backend,
    choose_attention_backend,
    diffusers_models,
    hooked_processors,
)


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, out_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


def _flux_input_grad(model):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, generator=gen, requires_grad=True)  # packed (B, N, C)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    out = model(hidden_states=latents, encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
                pooled_projections=torch.randn(2, 8, generator=gen), timestep=torch.tensor([0.5, 0.25]),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3)).sample
    (grad,) = torch.autograd.grad((out * out).sum(), latents)
    return out.detach(), grad


def _input_grad(model):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    text = torch.randn(2, 5, 16, generator=gen)
    pooled = torch.randn(2, 8, generator=gen)
    out = model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([500.0, 250.0])).sample
    (grad,) = torch.autograd.grad((out * out).sum(), latents)
    return out.detach(), grad


def test_cpu_choice_is_sdpa():
    assert choose_attention_backend("auto", "cpu")[0] == "native"
    backend, why = choose_attention_backend("flash", "cpu")
    assert backend == "native" and "falling back" in why
    with pytest.raises(ValueError, match="unknown attention backend"):
        choose_attention_backend("fast", "cpu")


def test_networks_without_diffusers_models_are_left_alone():
    assert apply_attention_backend([torch.nn.Linear(2, 2)], "flash") is None


def test_flux_takes_the_backend_through_diffusers_and_keeps_input_gradients(caplog):
    model = _tiny_flux().requires_grad_(False)
    wrapper = torch.nn.Sequential(model)  # an adapter holding the diffusers model
    assert diffusers_models([wrapper, model]) == [model]
    want_out, want_grad = _flux_input_grad(model)
    with caplog.at_level("INFO", logger="sid_fast.kernels"):
        assert apply_attention_backend([wrapper], "xformers") == "native"
    assert "attention backend: native" in caplog.text and "falling back" in caplog.text
    backends = {str(m.processor._attention_backend.value) for m in model.modules()
                if hasattr(getattr(m, "processor", None), "_attention_backend")}
    assert hooked_processors(model) == 2 and backends == {"native"}
    out, grad = _flux_input_grad(model)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(grad, want_grad)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_sd3_runs_sdpa_without_a_hook_and_says_so(caplog):
    model = _tiny_sd3().requires_grad_(False)
    with caplog.at_level("INFO", logger="sid_fast.kernels"):
        assert apply_attention_backend([model], "auto") == "native"
    assert hooked_processors(model) == 0 and "no diffusers backend hook" in caplog.text
    out, grad = _input_grad(model)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
