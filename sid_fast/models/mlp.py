"""A small learned velocity network for vector data: the toy stand-in for a DiT (generator and fake score)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sid_fast.models.protocol import Conditioning


def timestep_embedding(t: Tensor, dim: int, max_period: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like the DiTs), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class VelocityMLP(nn.Module):
    """v(x_t, t, label): MLP over [x_t, time embedding, label embedding]; label -1 (or None) = unconditional.

    x_t: (B, ...) flattened to (B, dim). Returns x_t's shape.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, num_classes: int = 0, time_dim: int = 64):
        super().__init__()
        self.dim, self.num_classes, self.time_dim = dim, num_classes, time_dim
        self.label_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        shape = x_t.shape
        x = x_t.flatten(1)
        h = self.trunk[0](torch.cat([x, timestep_embedding(t, self.time_dim).to(x.dtype)], dim=1))
        if self.label_embed is not None:
            labels = cond.labels if cond is not None and cond.labels is not None else None
            index = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            if labels is not None:
                index = torch.where(labels < 0, index, labels.long())
            h = h + self.label_embed(index)
        h = self.trunk[1:](h)
        return self.out(h).reshape(shape)

    def forward_flops(self, batch_shape: tuple[int, ...]) -> float:
        """Analytic FLOPs of one forward of a batch of shape `batch_shape` (2 per multiply-add of the linears)."""
        macs = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return 2.0 * batch_shape[0] * macs

    def feature_module(self) -> nn.Module:
        """The output layer; its input (B, hidden) is the last hidden layer, the §5 discriminator feature."""
        return self.out
