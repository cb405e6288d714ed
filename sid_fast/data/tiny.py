"""Tiny encoders built in code (no downloads): a word-hash tokenizer + embedding + one transformer layer for
prompts, and a two-level AutoencoderKL for images. Used by tests, benchmarks and `--encoder tiny`."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from sid_fast.models.protocol import Conditioning


class TinyPromptEncoder(nn.Module):
    """Prompts -> Conditioning(embeds (B, L, D), pooled (B, D), mask (B, L) int64), deterministic for a seed.

    Tokens: a BOS token, then one id per lower-cased word (crc32 hash into the vocabulary), padded with 0 to L.
    """

    def __init__(self, dim: int = 32, max_length: int = 16, vocab: int = 1024, seed: int = 0):
        super().__init__()
        self.max_length, self.vocab = max_length, vocab
        self.teacher_id = f"tiny-d{dim}-l{max_length}-v{vocab}-seed{seed}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(vocab, dim)
            self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.eval().requires_grad_(False)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> ids (B, L) int64, mask (B, L) int64 (1 = token)."""
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = [1] + [2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in prompt.lower().split()]
            words = words[: self.max_length]
            ids[row, : len(words)] = torch.tensor(words)
        return ids, (ids != 0).long()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        ids, mask = self.tokenize(prompts)
        hidden = self.layer(self.embedding(ids), src_key_padding_mask=mask == 0)  # (B, L, D)
        hidden = hidden * mask.unsqueeze(-1)
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        return Conditioning(embeds=hidden, pooled=pooled, mask=mask)

    def unconditional(self) -> Conditioning:
        return self.encode([""])


def tiny_vae(seed: int = 0, latent_channels: int = 4) -> nn.Module:
    """A randomly initialised two-level diffusers AutoencoderKL (downsamples by 2), built from constructor args."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                            latent_channels=latent_channels, norm_num_groups=4, sample_size=16)
    return vae.eval().requires_grad_(False)
