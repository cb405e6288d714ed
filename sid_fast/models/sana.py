"""SANA teachers (`SanaTransformer2DModel`): SANA 0.6B/1.6B flow-matching teachers and SANA-Sprint teachers.

§1 conventions: latent = DC-AE, 32 ch at H/32; text = Gemma-2 hidden states (`cond.embeds`, (B, 300, 2304))
with their attention mask (`cond.mask`, (B, 300), 1 = keep); guidance = true CFG (`sid_fast.guidance`).
Timestep given to the transformer (`timestep_mode`):
  `1000t`  1000·t·config.timestep_scale, what SanaPipeline passes (RF teachers; timestep_scale is 1 for them);
  `t`      t itself (SANA-Sprint teachers).
  `auto`   `t` when the transformer has a guidance embedding (the SANA-Sprint architecture), else `1000t`.
A transformer with learned sigma (out_channels = 2·in_channels) returns only its first half, as the pipeline does.
A guidance-embedding transformer gets g = cond.guidance or `guidance`, times config.guidance_embeds_scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sid_fast.models.adapter_base import DiffusersAdapter
from sid_fast.models.protocol import Conditioning

TIMESTEP_MODES = ("auto", "1000t", "t")


class SanaAdapter(DiffusersAdapter):
    """(x_t (B, C, h, w), t (B,), cond with embeds (B, L, D) and mask (B, L)) -> velocity (B, C, h, w)."""

    family = "sana"

    def __init__(self, transformer: nn.Module, timestep_mode: str = "auto", guidance: float = 4.5):
        super().__init__(transformer)
        if timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"sana_timestep must be one of {TIMESTEP_MODES}, got {timestep_mode!r}")
        if timestep_mode == "auto":
            timestep_mode = "t" if transformer.config.guidance_embeds else "1000t"
        self.timestep_mode = timestep_mode
        self.guidance = float(guidance)

    def transformer_timestep(self, t: Tensor) -> Tensor:
        """(B,) time in [0, 1] -> the transformer's timestep (§1 table)."""
        if self.timestep_mode == "t":
            return t
        return 1000.0 * t * self.transformer.config.timestep_scale

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.embeds is None:
            raise ValueError("SanaAdapter: the conditioning needs `embeds` (B, L, D) (and `mask` (B, L))")
        config = self.transformer.config
        guidance = None
        if config.guidance_embeds:
            value = cond.guidance if cond.guidance is not None else torch.full((x_t.shape[0],), self.guidance)
            guidance = value.to(device=x_t.device, dtype=self.dtype) * config.guidance_embeds_scale
        mask = cond.mask
        cond = self._cond(cond)
        out = self.transformer(
            x_t.to(self.dtype),
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=None if mask is None else mask.to(x_t.device),
            timestep=self.transformer_timestep(t),
            guidance=guidance,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned sigma: keep the velocity half
            out = out.chunk(2, dim=1)[0]
        return out.to(x_t.dtype)
