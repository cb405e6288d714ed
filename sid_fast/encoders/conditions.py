"""A `ConditionSource` over prompts encoded once up front (DESIGN.md §1: the unconditional is the encoded "")."""

from __future__ import annotations

from pathlib import Path

import torch

from sid_fast.models.protocol import Conditioning


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped. Errors (sid_fast.errors.InputError) name the file: missing,
    a directory, empty, or not text (then also the line)."""
    from sid_fast.data.sources import text_lines
    from sid_fast.errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"prompt file {path}: is a directory; give a text file, one prompt a line")
    if not path.is_file():
        raise InputError(f"prompt file {path}: does not exist")
    prompts = [line.strip() for _, line in text_lines(path) if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path}: has no prompts (every line is empty)")
    return prompts


DEVICE_BANK_BYTES = 1 << 30
"""Largest prompt bank `EmbeddingConditions` copies to the accelerator to draw batches without a host sync."""


class EmbeddingConditions:
    """Draws conditionings uniformly from a bank of N encoded prompts.

    bank: a Conditioning of batch N (e.g. embeds (N, L, D), pooled (N, P), mask (N, L)).
    uncond: the encoded empty prompt, batch 1 (expanded to any batch size).
    prompts: the N prompt texts in bank order, when known (in-loop CLIP / ShapesWorld evaluation reads them).
    Draws come from the trainer's generator, which the checkpoint saves, so the source itself holds no state.
    """

    def __init__(self, bank: Conditioning, uncond: Conditioning, prompts: list[str] | None = None):
        if len(uncond) != 1:
            raise ValueError(f"the unconditional embedding must have batch 1, got {len(uncond)}")
        if sorted(bank.tensors()) != sorted(uncond.tensors()):
            raise ValueError(f"bank fields {sorted(bank.tensors())} differ from unconditional fields {sorted(uncond.tensors())}")
        if prompts is not None and len(prompts) != len(bank):
            raise ValueError(f"{len(prompts)} prompt texts for a bank of {len(bank)} encoded prompts")
        self.bank, self.uncond, self.prompts = bank, uncond, prompts

    def __len__(self) -> int:
        return len(self.bank)

    def sample(self, batch_size: int, generator: torch.Generator) -> Conditioning:
        index = torch.randint(len(self.bank), (batch_size,), generator=generator, device=generator.device)
        if generator.device.type == "cpu":
            return self.bank[index]
        # indices drawn on an accelerator: index a copy of the bank held there (no device-to-host read per batch)
        # when it is small; a large bank (real prompt sets: stream them as shards instead) reads the indices back
        if self.bank.nbytes() > DEVICE_BANK_BYTES:
            return self.bank[index.cpu()]
        device_bank = getattr(self, "_device_bank", None)
        if device_bank is None or device_bank[0] != generator.device:
            self._device_bank = device_bank = (generator.device, self.bank.to(generator.device))
        return device_bank[1][index]

    def unconditional(self, batch_size: int) -> Conditioning:
        return self.uncond.expand_to(batch_size)

    def state_dict(self) -> dict:
        return {"num_prompts": len(self.bank)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_prompts") != len(self.bank):
            raise ValueError(f"checkpoint was trained on {state.get('num_prompts')} prompts, this source has {len(self.bank)}")
