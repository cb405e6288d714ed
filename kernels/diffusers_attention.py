"""Backend-dispatching twins of the diffusers 0.42 attention processors that call SDPA themselves.

diffusers' `ModelMixin.set_attention_backend` reaches only processors that carry `_attention_backend` and route
their attention through `attention_dispatch.dispatch_attention_fn` (FLUX's do). SD3/SD3.5's `JointAttnProcessor2_0`
(joint attention with the context branch, qk norms, and the SD3.5 dual-attention `attn2`, which shares the
block's processor) and SANA's softmax cross-attention `SanaAttnProcessor2_0` call `F.scaled_dot_product_attention`
directly, so a flash-attn or xformers choice never reaches them. The twins below compute exactly what those
processors compute — same projections, norms, concatenation order ([sample, context]), mask preparation, output
projections — and only hand the attention itself to the dispatcher, with `_attention_backend`/`_parallel_config`
like diffusers' own dispatching processors.

Layout: q, k, v are built as diffusers builds them, in (B, H, S, D) memory order, and handed to the dispatcher as
(B, S, H, D) views (the layout it expects; flash-attn and xformers take any strides with a contiguous last dim).
The native backend permutes them back, so SDPA receives the very tensors diffusers gives it: bit-equal outputs and
gradients with the native backend (tests/test_kernel_attention.py).

A backend that cannot take a call runs that call on native SDPA instead, with one log line per (backend, reason):
a mask (SANA's text padding mask) with a backend that rejects masks (flash-attn 2/3, sage, ...: diffusers raises),
or fp32 inputs with an fp16/bf16-only backend (from diffusers' own constraint list).

SANA's self-attention (`SanaLinearAttnProcessor2_0`) is linear attention, not softmax: there is nothing to dispatch
and it is left as it is. Imports diffusers: loaded by `install_dispatch_processors` only.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _check_qkv_dtype_bf16,
    _check_qkv_dtype_bf16_or_fp16,
    dispatch_attention_fn,
)
from diffusers.models.attention_processor import (
    JointAttnProcessor2_0,
    PAGCFGSanaLinearAttnProcessor2_0,
    PAGIdentitySanaLinearAttnProcessor2_0,
    SanaLinearAttnProcessor2_0,
)
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from torch import Tensor, nn

log = logging.getLogger("sid_fast.kernels")

NO_MASK_BACKENDS = frozenset(
    AttentionBackendName(name)
    for name in ("flash", "flash_hub", "flash_4_hub", "_flash_3", "_flash_3_hub", "aiter_fa2_hub", "_native_flash",
                 "_native_xla", "sage", "sage_hub", "sage_blackwell_hub", "_sage_qk_int8_pv_fp8_cuda",
                 "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_triton"))
"""Backends whose diffusers 0.42.1 function raises on `attn_mask` (or would drop it)."""

_HALF_DTYPES = {
    name: (torch.bfloat16,) if _check_qkv_dtype_bf16 in checks else (torch.float16, torch.bfloat16)
    for name, checks in _AttentionBackendRegistry._constraints.items()
    if _check_qkv_dtype_bf16 in checks or _check_qkv_dtype_bf16_or_fp16 in checks
}
"""Backend -> the only q/k/v dtypes it runs (diffusers' own constraint list, enforced by it only when
DIFFUSERS_ATTN_CHECKS is set; the kernels themselves raise otherwise)."""

_LOGGED: set[tuple[str, str]] = set()


def _fallback_reason(backend: AttentionBackendName, query: Tensor, attn_mask: Tensor | None) -> str | None:
    if attn_mask is not None and (backend in NO_MASK_BACKENDS
                                  or "attn_mask" not in _AttentionBackendRegistry._supported_arg_names[backend]):
        return "it takes no attention mask"
    dtypes = _HALF_DTYPES.get(backend)
    if dtypes is not None and query.dtype not in dtypes:
        return f"it does not run {query.dtype}"
    return None


class _DispatchingProcessor:
    """What the twins share: the attributes `set_attention_backend` looks for, and the dispatch with fallback."""

    _attention_backend = None
    _parallel_config = None

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attention of (B, S, H, D) q/k/v (any strides, contiguous head dim) -> (B, S, H, D)."""
        backend = self._attention_backend
        name = backend if backend is not None else _AttentionBackendRegistry._active_backend
        name = name if isinstance(name, AttentionBackendName) else AttentionBackendName(name)
        reason = _fallback_reason(name, query, attn_mask)
        if reason is not None:
            if not torch.compiler.is_compiling() and (name.value, reason) not in _LOGGED:
                _LOGGED.add((name.value, reason))
                log.warning("attention: %s runs PyTorch SDPA instead of %s for these calls: %s",
                            type(self).__name__, name.value, reason)
            backend = AttentionBackendName.NATIVE
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=backend, parallel_config=self._parallel_config)


class DispatchJointAttnProcessor(_DispatchingProcessor, JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` (SD3, SD3.5 joint attention and dual-attention `attn2`) through the dispatcher."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        # attention_mask is ignored, as by diffusers' processor
        residual_len = hidden_states.shape[1]
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:  # the context branch, appended after the sample tokens
            c_query, c_key, c_value = (
                proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)

        hidden_states = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :residual_len], hidden_states[:, residual_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class DispatchSanaAttnProcessor(_DispatchingProcessor, SanaAttnProcessor2_0):
    """`SanaAttnProcessor2_0` (SANA's softmax cross-attention to the text, with its padding mask) through the
    dispatcher. The mask is the additive bias SANA's forward builds, prepared per head as diffusers does:
    (B, H, 1, L)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:  # across heads, before the head split, as diffusers does
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))

        hidden_states = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     attn_mask=attention_mask)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


DISPATCH_CLASSES: dict[type, type] = {
    JointAttnProcessor2_0: DispatchJointAttnProcessor,
    SanaAttnProcessor2_0: DispatchSanaAttnProcessor,
}
"""diffusers processor class -> its dispatching twin (exact types only: a subclass may compute something else)."""

LINEAR_ATTENTION_CLASSES: tuple[type, ...] = (
    SanaLinearAttnProcessor2_0, PAGCFGSanaLinearAttnProcessor2_0, PAGIdentitySanaLinearAttnProcessor2_0)
"""Processors of linear (not softmax) attention: no attention backend applies to them."""


def install_dispatch_processors(model: nn.Module) -> Counter:
    """Give every attention module of `model` whose processor is exactly a class of DISPATCH_CLASSES a fresh
    instance of its twin (modules that shared one processor share its twin: SD3.5's attn and attn2); returns the
    number of modules switched per original class name. Model code, parameters and state-dict keys are untouched."""
    twins: dict[int, tuple[object, object]] = {}  # id(original) -> (original, twin): keeps the original alive
    switched: Counter = Counter()
    for module in model.modules():
        processor = getattr(module, "processor", None)
        twin_class = DISPATCH_CLASSES.get(type(processor))
        if twin_class is None:
            continue
        if id(processor) not in twins:
            twins[id(processor)] = (processor, twin_class())
        twin = twins[id(processor)][1]
        if hasattr(module, "set_processor"):
            module.set_processor(twin)
        else:
            module.processor = twin
        switched[type(processor).__name__] += 1
    return switched


def linear_attention_processors(model: nn.Module) -> int:
    """Attention modules of `model` whose processor computes linear attention (SANA's self-attention)."""
    return sum(1 for m in model.modules() if isinstance(getattr(m, "processor", None), LINEAR_ATTENTION_CLASSES))
