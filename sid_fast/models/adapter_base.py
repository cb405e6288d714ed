"""The base of the diffusers teacher adapters (SD3, FLUX, SANA): a module holding one diffusers transformer
and exposing the model protocol `(x_t, t, cond) -> velocity` (see `protocol.py`, DESIGN.md §1).

Adapters take and return *unpacked* latents (B, C, h, w) for every family, so the trainer's `sample_shape`
is always (C, h, w); FLUX packs 2x2 patches into tokens inside its adapter. Inputs are cast to the
transformer's dtype and the velocity is returned in x_t's dtype.
"""

from __future__ import annotations

from torch import Tensor, nn

from sid_fast.models.protocol import Conditioning


class DiffusersAdapter(nn.Module):
    """Wraps `transformer` (a diffusers ModelMixin); subclasses implement `velocity`."""

    family: str = ""
    """Family name, as registered (sd3, flux, sana)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def dtype(self):
        return next(self.transformer.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        """Channels C of the unpacked latent the adapter takes."""
        return int(self.transformer.config.in_channels)

    def _cond(self, cond: Conditioning) -> Conditioning:
        return cond.to(device=next(self.transformer.parameters()).device, dtype=self.dtype)

    def _check_input(self, x_t: Tensor, t: Tensor) -> None:
        if x_t.ndim != 4 or x_t.shape[1] != self.latent_channels:
            raise ValueError(f"{type(self).__name__}: x_t must be (B, {self.latent_channels}, h, w), got {tuple(x_t.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"{type(self).__name__}: t must be ({x_t.shape[0]},), got {tuple(t.shape)}")

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """x_t: (B, C, h, w); t: (B,) in [0, 1]; returns the §1 velocity (B, C, h, w) in x_t's dtype."""
        self._check_input(x_t, t)
        return self.velocity(x_t, t, cond)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        raise NotImplementedError

    def feature_module(self) -> nn.Module:
        """The output projection; its input is the token sequence after the final adaptive norm (B, N, D),
        image tokens only in every family (FLUX drops the text tokens before `norm_out`). §5 discriminator."""
        return self.transformer.proj_out
