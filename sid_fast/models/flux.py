"""FLUX.1 teachers (`FluxTransformer2DModel`), with the guidance embedding of FLUX.1-dev (DESIGN.md §1, §4).

§1 conventions: the transformer takes t itself (it scales by 1000 inside); latents are 16 ch at H/8, packed
2x2 into (B, h/2·w/2, 64) tokens with `img_ids` (row, column) and all-zero `txt_ids`; text = T5 hidden states
(`cond.embeds`, (B, 512, 4096)) and the CLIP-L pooled embedding (`cond.pooled`, (B, 768)).

The adapter takes UNPACKED latents (B, 16, h, w) (h, w even) and packs/unpacks inside, so the trainer's
sample shape is (16, h, w) as for SD3.

Guidance (§4), for a guidance-distilled model (`guidance_embeds=True`):
  plain call `model(x_t, t, cond)`: g = cond.guidance when given, else `plain_guidance` (1: the generator gets
    no guidance, §2);
  `guided_velocity(x_t, t, cond, uncond, κ)` (what `sid_fast.guidance` calls for teacher and fake score):
    mode `embed`      one pass with g = `guidance` (3.5 default); κ only picks cond (κ ≠ 0) or uncond (κ = 0);
    mode `embed+cfg`  κ ∉ {0, 1}: g = κ and true CFG at κ over the batch [∅, c]; κ ∈ {0, 1}: as `embed`.
A model without a guidance embedding (FLUX.1-schnell-like) gets plain true CFG at κ in either mode.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from sid_fast.guidance import combine_cfg
from sid_fast.models.adapter_base import DiffusersAdapter
from sid_fast.models.protocol import Conditioning

GUIDANCE_MODES = ("embed", "embed+cfg")


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C): 2x2 patches as tokens, row-major (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {tuple(latents.shape)}")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, h/2·w/2, 4C) -> (B, C, h, w), the inverse of `pack_latents` (latent height/width, not pixels)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"cannot unpack tokens {tuple(tokens.shape)} to a {height}x{width} latent")
    patches = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return patches.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """(h/2·w/2, 3) position ids of the packed tokens: (0, row, column), as FluxPipeline builds them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(DiffusersAdapter):
    """(x_t (B, 16, h, w), t (B,), cond with embeds (B, L, D), pooled (B, P)) -> velocity (B, 16, h, w)."""

    family = "flux"

    def __init__(self, transformer: nn.Module, guidance_mode: str = "embed", guidance: float = 3.5,
                 plain_guidance: float = 1.0):
        super().__init__(transformer)
        if guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"flux_guidance_mode must be one of {GUIDANCE_MODES}, got {guidance_mode!r}")
        self.guidance_mode = guidance_mode
        self.guidance = float(guidance)
        self.plain_guidance = float(plain_guidance)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    @property
    def has_guidance_embed(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        value = cond.guidance if cond.guidance is not None else self.plain_guidance
        return self._velocity(x_t, t, cond, value)

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor | float) -> Tensor:
        if cond.embeds is None or cond.pooled is None:
            raise ValueError("FluxAdapter: the conditioning needs `embeds` (B, L, D) and `pooled` (B, P)")
        b, _, h, w = x_t.shape
        device = x_t.device
        cond = self._cond(replace(cond, guidance=None))
        if self.has_guidance_embed:
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=device).expand(b)
        else:
            guidance = None
        tokens = self.transformer(
            hidden_states=pack_latents(x_t.to(self.dtype)),  # (B, N, 64)
            timestep=t.to(self.dtype),  # §1: FLUX takes t and scales by 1000 itself
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=device, dtype=self.dtype),
            img_ids=latent_image_ids(h, w, device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, h, w).to(x_t.dtype)  # (B, 16, h, w)

    def guided_velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, scale: float) -> Tensor:
        """§4 guidance for teacher and fake score; see the module docstring for the two modes."""
        self._check_input(x_t, t)
        true_cfg = scale not in (0.0, 1.0) and (self.guidance_mode == "embed+cfg" or not self.has_guidance_embed)
        if not true_cfg:
            return self._velocity(x_t, t, uncond if scale == 0.0 else cond, self.guidance)
        batch = x_t.shape[0]
        both_cond = Conditioning.cat([replace(uncond, guidance=None), replace(cond, guidance=None)])
        # §4 embed+cfg: g = κ and CFG at κ, one forward over [∅, c]
        both = self._velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), both_cond, scale)
        return combine_cfg(both[:batch], both[batch:], scale)
