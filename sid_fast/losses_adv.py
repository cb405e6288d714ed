"""The adversarial terms of SiD²ₐ (DESIGN.md §5), with the fake score network as the discriminator.

Logits are (B, D): the fake network's tokens after its final adaptive norm, mean-pooled over image tokens, each
hidden channel one logit (`sid_fast.adversarial.discriminator_logits`). Losses are computed in fp32 (§3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOGIT_CLAMP = 10.0
"""Logits are clamped to ±LOGIT_CLAMP before the BCE (§5)."""


def clamped_bce(logits: Tensor, target: float) -> Tensor:
    """mean over channels of BCE(clamp(logits, ±10), target): (B, D) -> (B,)."""
    logits = logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)), reduction="none").mean(1)


# §5: L_D = mean_b (C·H·W)·½·[mean_ch BCE(clamp(real), 1) + mean_ch BCE(clamp(fake), 0)]
def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, elements: int) -> Tensor:
    """Per-sample L_D (B,); `elements` = C·H·W of one latent. Mean over the batch is the fake network's term."""
    if real_logits.shape != fake_logits.shape:
        raise ValueError(f"real logits {tuple(real_logits.shape)} and fake logits {tuple(fake_logits.shape)} differ")
    return elements * 0.5 * (clamped_bce(real_logits, 1.0) + clamped_bce(fake_logits, 0.0))


# §5: L_adv = mean_b (C·H·W)·λ(t)·mean_ch BCE(clamp(logits of the generator's x_t), 1)
def adversarial_generator_loss(logits: Tensor, weight: Tensor, elements: int) -> Tensor:
    """Per-sample L_adv (B,); weight: λ(t) of shape (B,) (or broadcastable, e.g. (B, 1, ...)), no grad."""
    weight = weight.detach().float().reshape(logits.shape[0], -1)[:, 0]
    return elements * weight * clamped_bce(logits, 1.0)
