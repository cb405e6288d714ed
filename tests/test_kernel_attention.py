"""Attention backend choice through diffusers' mechanism (kernels/attention.py): SDPA on the CPU, fallback with a
log line for unavailable backends, the input-gradient backward of a frozen network (§3), and the dispatching twins
of SD3/SD3.5's and SANA's SDPA-calling processors (kernels/diffusers_attention.py): bit-equal to diffusers' own
processors with the native backend, every attention call through the dispatcher, per-call fallback to SDPA where a
backend cannot take the call, and no graph break under torch.compile."""

import copy

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from sid_fast.kernels import attention as attention_module
from sid_fast.kernels import diffusers_attention
from sid_fast.kernels.attention import (
    apply_attention_backend,
    choose_attention_backend,
    diffusers_models,
    hooked_processors,
)
from sid_fast.kernels.diffusers_attention import DispatchJointAttnProcessor, DispatchSanaAttnProcessor
from sid_fast.models import tiny_components


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


# name -> (family, builder): tiny SD3 (the last block context_pre_only), SD3.5 (dual attention in block 0, qk
# RMSNorm, attn and attn2 sharing one processor), SANA (linear self-attention, masked softmax cross-attention) and
# SANA with qk RMSNorm across heads (SANA 1.5 / Sprint)
MODELS = {
    "sd3": ("sd3", lambda: tiny_components.transformer("sd3", "tiny")),
    "sd35": ("sd3", lambda: tiny_components.transformer("sd3", "sd35-tiny")),
    "sana": ("sana", lambda: tiny_components.transformer("sana", "tiny")),
    "sana-qknorm": ("sana", lambda: _sana_qk_norm()),
}
ATTENTION_CALLS = {"sd3": 2, "sd35": 3, "sana": 2, "sana-qknorm": 2}  # softmax attention calls per forward


def _sana_qk_norm():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=2,
                                  qk_norm="rms_norm_across_heads").eval()


def _model(name):
    torch.manual_seed(0)
    return MODELS[name][1]()


def _inputs(family: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    if family == "sd3":
        return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=gen),
                    encoder_hidden_states=torch.randn(2, 8, 32, generator=gen),
                    pooled_projections=torch.randn(2, 32, generator=gen), timestep=torch.tensor([500.0, 250.0]))
    return dict(hidden_states=torch.randn(2, 8, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                timestep=torch.tensor([500.0, 250.0]))


def _output_and_gradients(model, family: str, **changes) -> dict[str, torch.Tensor]:
    """The output, the latent and text input gradients and every parameter gradient of Σ w · out."""
    inputs = {**_inputs(family), **changes}
    leaves = {name: inputs[name].clone().requires_grad_() for name in ("hidden_states", "encoder_hidden_states")}
    inputs.update(leaves)
    out = model(**inputs).sample
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out * weights).sum(), [*leaves.values(), *params.values()], allow_unused=True)
    found = {"out": out.detach()}
    for name, grad in zip([*leaves, *params], grads, strict=True):
        if grad is not None:
            found[f"d/d{name}"] = grad
    return found


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the calls that reach diffusers' native backend through `dispatch_attention_fn`."""
    calls = []
    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def counted(**kwargs):
        calls.append(kwargs.get("attn_mask"))
        return native(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, counted)
    monkeypatch.setattr(diffusers_attention, "_LOGGED", set())
    return calls


def test_cpu_choice_is_sdpa():
    assert choose_attention_backend("auto", "cpu")[0] == "native"
    backend, why = choose_attention_backend("flash", "cpu")
    assert backend == "native" and "falling back" in why
    with pytest.raises(ValueError, match="unknown attention backend"):
        choose_attention_backend("fast", "cpu")


def test_flash_3_without_a_backward_is_not_chosen(monkeypatch):
    """diffusers 0.42.1 wraps flash-attn 3 in a custom op with no autograd formula: training could not backward."""
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_module, "_installed", lambda backend: True)  # as on a GPU with all three
    assert attention_dispatch._wrapped_flash_attn_3._backward_fn is None  # the pinned diffusers' op
    backend, why = choose_attention_backend("auto", "cuda")
    assert backend == "flash" and "flash_3 has no backward" in why
    backend, why = choose_attention_backend("flash_3", "cuda")
    assert backend == "native" and "no backward" in why and "falling back" in why

    class WithBackward:
        _backward_fn = staticmethod(lambda ctx, *grads: grads)

    monkeypatch.setattr(attention_dispatch, "_wrapped_flash_attn_3", WithBackward())
    assert choose_attention_backend("auto", "cuda") == ("flash_3", "auto: best usable on CUDA")


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


@pytest.mark.parametrize("name", list(MODELS))
def test_dispatching_processors_are_bit_equal_and_hooked(name, native_calls, caplog):
    """auto on the CPU (the default): the installed twins give the same output, input gradients and parameter
    gradients, bit for bit, as diffusers' own SDPA-calling processors, and every softmax attention call goes
    through diffusers' dispatcher."""
    family = MODELS[name][0]
    model = _model(name)
    want = _output_and_gradients(model, family)
    assert hooked_processors(model) == 0 and not native_calls  # diffusers' processors call SDPA themselves
    keys = list(model.state_dict())
    with caplog.at_level("INFO", logger="sid_fast.kernels"):
        assert apply_attention_backend([model], "auto") == "native"
    twin = DispatchJointAttnProcessor if family == "sd3" else DispatchSanaAttnProcessor
    assert hooked_processors(model) == ATTENTION_CALLS[name]
    assert sum(isinstance(getattr(m, "processor", None), twin) for m in model.modules()) == ATTENTION_CALLS[name]
    assert f"{ATTENTION_CALLS[name]} processor(s) dispatched" in caplog.text
    assert "no diffusers backend hook" not in caplog.text  # SANA's linear self-attention is reported apart
    assert ("linear-attention" in caplog.text) == (family == "sana")
    assert list(model.state_dict()) == keys
    got = _output_and_gradients(model, family)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert len(native_calls) == ATTENTION_CALLS[name]
    if family == "sana":  # the text mask reaches the backend, as the (B, H, 1, L) bias diffusers builds
        assert all(mask is not None and mask.shape == (2, 2, 1, 5) for mask in native_calls)
    # set_attention_backend reaches the twins; an EMA copy keeps them
    assert apply_attention_backend([model], "xformers") == "native"
    backends = {m.processor._attention_backend for m in model.modules()
                if isinstance(getattr(m, "processor", None), twin)}
    assert backends == {AttentionBackendName.NATIVE}
    assert hooked_processors(copy.deepcopy(model)) == ATTENTION_CALLS[name]


def test_sd35_dual_attention_keeps_one_shared_processor():
    model = _model("sd35")
    block = model.transformer_blocks[0]
    assert block.attn.processor is block.attn2.processor
    apply_attention_backend([model], "auto")
    assert block.attn.processor is block.attn2.processor
    assert isinstance(block.attn.processor, DispatchJointAttnProcessor)


def test_sana_text_mask_is_honoured():
    """With the twins, text tokens the mask drops change nothing in their sample, and do in an unmasked one."""
    model = _model("sana")
    apply_attention_backend([model], "auto")
    text = _inputs("sana")["encoder_hidden_states"]
    changed = text.clone()
    changed[:, 3:] += 1.0  # sample 0 masks tokens 3, 4; sample 1 keeps them
    base = _output_and_gradients(model, "sana")["out"]
    other = _output_and_gradients(model, "sana", encoder_hidden_states=changed)["out"]
    assert torch.equal(base[0], other[0])
    assert not torch.allclose(base[1], other[1])


def test_a_backend_that_cannot_take_the_call_falls_back_to_sdpa_once(native_calls, caplog):
    """flash-attn cannot take SANA's text mask, nor fp32 q/k/v: those calls run native SDPA, one log line each
    (set directly on the processors: set_attention_backend checks that flash-attn is installed)."""
    for name, reason in (("sana", "takes no attention mask"), ("sd3", "does not run torch.float32")):
        family = MODELS[name][0]
        model = _model(name)
        apply_attention_backend([model], "auto")
        want = _output_and_gradients(model, family)
        calls = len(native_calls)
        for module in model.modules():
            if hasattr(getattr(module, "processor", None), "_attention_backend"):
                module.processor._attention_backend = AttentionBackendName.FLASH
        with caplog.at_level("WARNING", logger="sid_fast.kernels"):
            caplog.clear()
            for _ in range(2):
                got = _output_and_gradients(model, family)
        assert all(torch.equal(got[key], want[key]) for key in want)
        assert len(native_calls) - calls == 2 * ATTENTION_CALLS[name]  # two forwards
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "instead of flash" in lines[0] and reason in lines[0], lines


def test_sana_with_a_maskless_backend_says_so(caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "choose_attention_backend", lambda preferred, device: ("flash", "requested"))
    model = _model("sana")
    monkeypatch.setattr(model, "set_attention_backend", lambda backend: None)  # flash-attn is not installed here
    with caplog.at_level("INFO", logger="sid_fast.kernels"):
        apply_attention_backend([model], "flash")
    assert "flash takes no attention mask" in caplog.text


def test_joint_block_compiles_without_graph_breaks():
    """One SD3.5 JointTransformerBlock (qk RMSNorm, context branch) with the twin, fullgraph (forward and backward
    traced by aot_eager): same output and input gradient as eager. (The dual-attention block compiles as well, at
    twice the time: its attn2 runs the same processor without the context branch.)"""
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    block = JointTransformerBlock(dim=16, num_attention_heads=2, attention_head_dim=8, qk_norm="rms_norm")
    assert diffusers_attention.install_dispatch_processors(block)["JointAttnProcessor2_0"] == 1
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 16, 16, generator=gen), torch.randn(2, 8, 16, generator=gen),
            torch.randn(2, 16, generator=gen))

    def run(module):
        x = args[0].clone().requires_grad_()
        hidden, context = module(x, *args[1:])
        (grad,) = torch.autograd.grad((hidden * hidden).sum() + (context * context).sum(), x)
        return hidden.detach(), context.detach(), grad

    want = run(block)
    torch._dynamo.reset()
    try:
        got = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
