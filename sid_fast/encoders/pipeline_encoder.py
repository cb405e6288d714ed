"""Prompt encoding that reproduces each pipeline's own conditioning: it calls the diffusers pipeline's
`encode_prompt` with only the text components loaded (no transformer, no VAE).

  SD3   CLIP-L + CLIP-G (77 tokens) + T5 -> embeds (B, 77 + L, D_t5), pooled (B, P)
  FLUX  T5 -> embeds (B, L, D_t5); CLIP-L pooled -> pooled (B, 768)
  SANA  Gemma-2 -> embeds (B, L, D), mask (B, L); non-empty prompts get the pipeline's instruction prefix
The unconditional is the encoding of "" (DESIGN.md §1), for SANA without the prefix, as SanaPipeline does.

Use batch by batch (a data-preparation step), then `release()` before training:

    encoder = PromptEncoder.from_pretrained("/models/sd3-medium", "sd3")
    cond = encoder.encode(["a red bicycle", "two cats"])   # Conditioning of batch 2
    uncond = encoder.unconditional()                        # Conditioning of batch 1
    encoder.release()
"""

from __future__ import annotations

import gc
import inspect
from pathlib import Path

import torch

from sid_fast.models.protocol import Conditioning

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline"}
TEXT_PARTS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"), "flux": ("text_encoder", "text_encoder_2"),
              "sana": ("text_encoder",)}
IMAGE_PARTS = ("transformer", "vae")


def pipeline_default(family: str, name: str):
    """A default argument of the family pipeline's __call__ (max_sequence_length, complex_human_instruction)."""
    import diffusers

    return inspect.signature(getattr(diffusers, PIPELINES[family]).__call__).parameters[name].default


class PromptEncoder:
    """encode(prompts) -> Conditioning; unconditional() -> Conditioning of batch 1; release() frees the encoders.

    pipeline: a diffusers pipeline of `family` holding at least the tokenizers and text encoders.
    max_sequence_length: T5/Gemma tokens (0: the pipeline's default).
    instruction: SANA's instruction prefix (None: the pipeline's default `complex_human_instruction`).
    """

    def __init__(self, pipeline, family: str, max_sequence_length: int = 0, instruction: list[str] | None = None,
                 device: str | torch.device = "cpu"):
        if family not in PIPELINES:
            raise ValueError(f"no prompt encoder for family {family!r}; known: {sorted(PIPELINES)}")
        self.pipeline, self.family, self.device = pipeline, family, torch.device(device)
        self.max_sequence_length = max_sequence_length or pipeline_default(family, "max_sequence_length")
        if family == "sana" and instruction is None:
            instruction = pipeline_default(family, "complex_human_instruction")
        self.instruction = instruction

    @classmethod
    def from_pretrained(cls, path: str | Path, family: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> PromptEncoder:
        """Load only the tokenizers and text encoders of the diffusers directory `path` (nothing downloaded)."""
        import diffusers

        path = Path(path)
        for part in TEXT_PARTS[family]:
            if not (path / part / "config.json").is_file():
                raise FileNotFoundError(f"{path / part / 'config.json'} is missing: the {family} teacher directory needs "
                                        f"its text encoders {TEXT_PARTS[family]} to encode prompts")
        pipeline = getattr(diffusers, PIPELINES[family]).from_pretrained(
            str(path), dtype=dtype, local_files_only=True, **{part: None for part in IMAGE_PARTS})
        pipeline.to(device)
        return cls(pipeline, family, device=device, **kwargs)

    @torch.no_grad()
    def _encode(self, prompts: list[str], instruction) -> Conditioning:
        pipe, length, device = self.pipeline, self.max_sequence_length, self.device
        if self.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                      max_sequence_length=length)
            return Conditioning(embeds=embeds, pooled=pooled)
        if self.family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=length)
            return Conditioning(embeds=embeds, pooled=pooled)
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=length, complex_human_instruction=instruction)
        return Conditioning(embeds=embeds, mask=mask)

    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditioning of batch len(prompts) on CPU; empty prompts encode as the unconditional does."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode() takes a non-empty list of prompts")
        if self.pipeline is None:
            raise RuntimeError("this PromptEncoder was released")
        if self.family != "sana" or all(prompts) or not any(prompts):
            return self._encode(list(prompts), self.instruction if all(prompts) else None).to("cpu")
        # SANA: the instruction prefix only for non-empty prompts; encode both groups and restore the order
        full = [i for i, p in enumerate(prompts) if p]
        empty = [i for i, p in enumerate(prompts) if not p]
        parts = Conditioning.cat([self._encode([prompts[i] for i in full], self.instruction),
                                  self._encode([""] * len(empty), None)])
        order = torch.argsort(torch.tensor(full + empty))
        return parts[order].to("cpu")

    def unconditional(self) -> Conditioning:
        """The encoded empty prompt "" (§1), batch 1."""
        return self.encode([""])

    def encode_all(self, prompts: list[str], batch_size: int = 32, progress: bool = False) -> Conditioning:
        """Encode `prompts` batch by batch into one Conditioning (CPU)."""
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding prompts", leave=False)
        return Conditioning.cat([self.encode(prompts[i:i + batch_size]) for i in starts])

    def release(self) -> None:
        """Drop the text encoders (call before training so their memory is free)."""
        self.pipeline = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
