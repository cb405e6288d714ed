"""Classifier-free guidance and the long-and-short guidance knobs of SiD (DESIGN.md §4).

CFG_k[v](x, t, c) = v(x, t, ∅) + k (v(x, t, c) - v(x, t, ∅)), evaluated as one batched forward of [∅, c].
k = 1 is one conditional pass and k = 0 one unconditional pass. A model that needs its own guidance
(FLUX.1-dev's guidance embedding) defines `guided_velocity(x_t, t, cond, uncond, scale)` and is used as is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sid_fast.models.protocol import Conditioning


# §4: v(∅) + k (v(c) - v(∅))
def combine_cfg(velocity_uncond: Tensor, velocity_cond: Tensor, scale: float) -> Tensor:
    return velocity_uncond + scale * (velocity_cond - velocity_uncond)


def guided_velocity(model, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, scale: float) -> Tensor:
    """The CFG-combined velocity of `model` at scale `scale` (§4), one batched forward when needed."""
    custom = getattr(model, "guided_velocity", None)
    if custom is not None:
        return custom(x_t, t, cond, uncond, scale)
    if scale == 1.0:
        return model(x_t, t, cond)
    if scale == 0.0:
        return model(x_t, t, uncond)
    velocity_uncond, velocity_cond = guided_velocity_pair(model, x_t, t, cond, uncond)
    return combine_cfg(velocity_uncond, velocity_cond, scale)


def guided_velocity_pair(model, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning) -> tuple[Tensor, Tensor]:
    """(v(x, t, ∅), v(x, t, c)) from one forward over the doubled batch [∅, c]."""
    batch = x_t.shape[0]
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
    return both[:batch], both[batch:]
