"""SD3 / SD3.5 teachers (`SD3Transformer2DModel`): SD3-Medium, SD3.5-Medium (dual attention, qk-norm), SD3.5-Large.

§1 conventions: timestep given to the transformer = 1000·t; latent 16 ch at H/8 (z = (E(x) − shift)·scale);
text = CLIP-L + CLIP-G + T5 hidden states (`cond.embeds`, (B, 77 + L_t5, 4096)) and the pooled CLIP
projections (`cond.pooled`, (B, 2048)); guidance = true CFG, handled by `sid_fast.guidance`.
"""

from __future__ import annotations

from torch import Tensor

from sid_fast.models.adapter_base import DiffusersAdapter
from sid_fast.models.protocol import Conditioning


class SD3Adapter(DiffusersAdapter):
    """(x_t (B, 16, h, w), t (B,), cond with embeds (B, L, D) and pooled (B, P)) -> velocity (B, 16, h, w)."""

    family = "sd3"

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.embeds is None or cond.pooled is None:
            raise ValueError("SD3Adapter: the conditioning needs `embeds` (B, L, D) and `pooled` (B, P)")
        cond = self._cond(cond)
        out = self.transformer(
            hidden_states=x_t.to(self.dtype),
            timestep=1000.0 * t,  # §1: SD3 takes 1000·t
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)
