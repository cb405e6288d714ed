"""The diffusers 0.42 modules that `install_block_kernels` switches to the block ops, and their fused twins.

Each `Fused*` class subclasses the diffusers class and overrides only `forward` (or `__call__` for the FLUX
attention processor), computing the same thing through the registry ops of kernels/block_ops.py with the
instance's `kernel_backend`. The installer swaps an instance's class in place, so parameters, buffers, state-dict
keys, forward hooks (ZeRO-3, FSDP) and peft adapters stay exactly as they were. Imports diffusers: loaded only by
the installer.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    RMSNorm,
    SD35AdaLayerNormZeroX,
)
from diffusers.models.transformers.sana_transformer import SanaModulatedNorm
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch import Tensor, nn

from sid_fast.kernels.block_ops import adaln_modulation, rms_norm, rotary_qk


def _plain_layer_norm(norm: nn.Module) -> str | None:
    """None when `norm` is an nn.LayerNorm without affine parameters (what adaln_modulation computes)."""
    if type(norm) is not nn.LayerNorm:
        return f"norm is {type(norm).__name__}, not nn.LayerNorm"
    if norm.weight is not None or norm.bias is not None:
        return "norm has affine parameters"
    return None


class _ModulationNorm:
    """What the five adaptive-norm twins share: they route through `adaln_modulation` (backend set per instance by
    the installer) and need their LayerNorm plain (no affine parameters)."""

    kernel_backend = "torch"
    op = "adaln_modulation"

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        return _plain_layer_norm(module.norm)


class FusedAdaLayerNormZero(_ModulationNorm, AdaLayerNormZero):
    """AdaLayerNormZero (SD3, FLUX double blocks) with the modulation through `adaln_modulation`."""

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = adaln_modulation(x, scale_msa, shift_msa, self.norm.eps, backend=self.kernel_backend)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class FusedAdaLayerNormZeroSingle(_ModulationNorm, AdaLayerNormZeroSingle):
    """AdaLayerNormZeroSingle (FLUX single blocks)."""

    def forward(self, x, emb=None):
        shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
        return adaln_modulation(x, scale_msa, shift_msa, self.norm.eps, backend=self.kernel_backend), gate_msa


class FusedSD35AdaLayerNormZeroX(_ModulationNorm, SD35AdaLayerNormZeroX):
    """SD35AdaLayerNormZeroX (SD3.5 dual-attention blocks): two modulations of one normalized input, as two
    fused calls (each recomputes the row statistics, cheaper than a stored normalized copy)."""

    def forward(self, hidden_states, emb=None):
        if self.kernel_backend == "torch":
            # the op's reference with the LayerNorm computed once, as diffusers does: two reference calls would
            # sum two LayerNorm backwards instead of differentiating one, which rounds the x-gradient differently
            return super().forward(hidden_states, emb)
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
         gate_msa2) = self.linear(self.silu(emb)).chunk(9, dim=1)
        eps, backend = self.norm.eps, self.kernel_backend
        modulated = adaln_modulation(hidden_states, scale_msa, shift_msa, eps, backend=backend)
        modulated2 = adaln_modulation(hidden_states, scale_msa2, shift_msa2, eps, backend=backend)
        return modulated, gate_msa, shift_mlp, scale_mlp, gate_mlp, modulated2, gate_msa2


class FusedAdaLayerNormContinuous(_ModulationNorm, AdaLayerNormContinuous):
    """AdaLayerNormContinuous with a plain LayerNorm (SD3/FLUX `norm_out`, SD3's last context norm)."""

    def forward(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return adaln_modulation(x, scale, shift, self.norm.eps, backend=self.kernel_backend)


class FusedSanaModulatedNorm(_ModulationNorm, SanaModulatedNorm):
    """SanaModulatedNorm (SANA `norm_out`): the table + timestep shift/scale are (B, 1, D)."""

    def forward(self, hidden_states: Tensor, temb: Tensor, scale_shift_table: Tensor) -> Tensor:
        shift, scale = (scale_shift_table[None] + temb[:, None].to(scale_shift_table.device)).chunk(2, dim=1)
        return adaln_modulation(hidden_states, scale.squeeze(1), shift.squeeze(1), self.norm.eps,
                                backend=self.kernel_backend)


class FusedRMSNorm(RMSNorm):
    """diffusers' RMSNorm (SD3.5 qk-norm, SANA qk-norm and caption norm) through `rms_norm`/`weighted_rms_norm`."""

    kernel_backend = "torch"
    op = "rms_norm"

    @staticmethod
    def unsupported(module: RMSNorm) -> str | None:
        if module.bias is not None:
            return "RMSNorm with bias"
        return None if len(module.dim) == 1 else f"normalizes over {len(module.dim)} dims"

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, backend=self.kernel_backend)


class FusedTorchRMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm (FLUX qk-norm): bit-equal in fp32; in fp16/bf16 the op rounds the normalized value once
    more before the weight multiplies (diffusers' RMSNorm rounding), within the STYLE.md tolerance."""

    kernel_backend = "torch"
    op = "rms_norm"

    @staticmethod
    def unsupported(module: nn.RMSNorm) -> str | None:
        return None if len(module.normalized_shape) == 1 else f"normalizes over {len(module.normalized_shape)} dims"

    def forward(self, x: Tensor) -> Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps, backend=self.kernel_backend)


class FusedFluxAttnProcessor(FluxAttnProcessor):
    """FLUX's attention processor with q and k rotated by one `rotary_qk` call; the rest as diffusers computes it
    (projections, qk-norm modules, attention through diffusers' dispatcher and its backend)."""

    kernel_backend = "torch"
    op = "rotary_qk"

    @staticmethod
    def unsupported(processor: FluxAttnProcessor) -> str | None:
        return None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, N, H, d)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)  # (B, L + N, H, d)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            cos, sin = (f.to(query.device) for f in image_rotary_emb)
            query, key = rotary_qk(query, key, cos, sin, backend=self.kernel_backend)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)  # (B, L + N, H d)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


FUSED_CLASSES: dict[type, type] = {
    AdaLayerNormZero: FusedAdaLayerNormZero,
    AdaLayerNormZeroSingle: FusedAdaLayerNormZeroSingle,
    SD35AdaLayerNormZeroX: FusedSD35AdaLayerNormZeroX,
    AdaLayerNormContinuous: FusedAdaLayerNormContinuous,
    SanaModulatedNorm: FusedSanaModulatedNorm,
    RMSNorm: FusedRMSNorm,
    nn.RMSNorm: FusedTorchRMSNorm,
    FluxAttnProcessor: FusedFluxAttnProcessor,
}
"""diffusers (or torch) class -> its fused twin; the installer matches exact types only (a subclass may compute
something else)."""
