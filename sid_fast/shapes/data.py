"""Training data of the ShapesWorld teacher: encoded training captions and scenes rendered on the fly to match.

Each draw picks a caption of the training split (a two-object one with probability `two_object_fraction`), renders
a fresh random scene satisfying it, and returns the image with the caption's MiniLM conditioning. The encoded
caption bank is held in float16 and cached in a safetensors file keyed by the encoder's id, so resumed runs do not
encode again.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.models.protocol import Conditioning
from sid_fast.shapes.captions import caption_set
from sid_fast.shapes.world import PromptSpec, render_batch, sample_scene


def write_caption_files(directory: str | Path) -> dict[str, Path]:
    """Write the four caption sets, one caption a line: {train,heldout}-{1,2}obj.txt; returns name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for objects in (1, 2):
        for split in ("train", "heldout"):
            path = directory / f"{split}-{objects}obj.txt"
            path.write_text("".join(f"{caption}\n" for caption, _ in caption_set(objects, split)))
            paths[path.stem] = path
    return paths


def encode_batches(encoder, prompts: list[str], batch_size: int = 256, progress: bool = False) -> Conditioning:
    """Any encoder's `encode` over `prompts` in batches, as one Conditioning of batch len(prompts)."""
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encoding captions", leave=False)
    return Conditioning.cat([encoder.encode(prompts[i:i + batch_size]) for i in starts])


def encode_cached(encoder, captions: list[str], cache: str | Path | None, progress: bool = False
                  ) -> tuple[Conditioning, Conditioning]:
    """(bank of batch N, unconditional of batch 1) for `captions`, read from / written to `cache` (safetensors)."""
    from safetensors.torch import load_file, save_file

    if cache is not None and Path(cache).is_file():
        from safetensors import safe_open

        stored = load_file(str(cache))
        with safe_open(str(cache), "pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("teacher_id") == encoder.teacher_id and int(meta.get("count", -1)) == len(captions):
            fields = {k.split(".", 1)[1] for k in stored if k.startswith("bank.")}
            return (Conditioning(**{f: stored[f"bank.{f}"] for f in fields}),  # floats stay float16: half the memory
                    Conditioning(**{f: stored[f"uncond.{f}"] for f in fields}))
        raise ValueError(f"{cache} holds captions encoded by {meta.get('teacher_id')!r} (count {meta.get('count')}), "
                         f"not {encoder.teacher_id!r} ({len(captions)}); delete it or use another out_dir")
    half = lambda value: value.half() if value.is_floating_point() else value  # noqa: E731
    bank = encode_batches(encoder, captions, progress=progress).map(half)  # (N, L, 384) float16: ~115 MB for all
    uncond = encoder.unconditional().map(half)
    if cache is not None:
        tensors = {f"bank.{k}": v.contiguous() for k, v in bank.tensors().items()}
        tensors.update({f"uncond.{k}": v.contiguous() for k, v in uncond.tensors().items()})
        tmp = Path(cache).with_name(f".{Path(cache).name}.tmp")
        save_file(tensors, str(tmp), metadata={"teacher_id": encoder.teacher_id, "count": str(len(captions))})
        tmp.replace(cache)
    return bank, uncond


class ShapesData:
    """sample(batch, rng) -> (images (B, 3, R, R) in [-1, 1], Conditioning of batch B); unconditional(batch).

    captions/specs: the training captions and their specs; bank: their conditioning (batch N); uncond: batch 1.
    """

    def __init__(self, captions: list[str], specs: list[PromptSpec], bank: Conditioning, uncond: Conditioning,
                 resolution: int = 32, two_object_fraction: float = 0.25):
        if not len(captions) == len(specs) == len(bank):
            raise ValueError(f"ShapesData: {len(captions)} captions, {len(specs)} specs, {len(bank)} encodings differ")
        if not 0.0 <= two_object_fraction <= 1.0:
            raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
        self.captions, self.specs, self.bank, self.uncond = captions, specs, bank, uncond
        self.resolution, self.two_object_fraction = resolution, two_object_fraction
        two = torch.tensor([len(spec.objects) == 2 for spec in specs])
        self.one_index, self.two_index = torch.nonzero(~two)[:, 0], torch.nonzero(two)[:, 0]
        if len(self.one_index) == 0 or (two_object_fraction > 0 and len(self.two_index) == 0):
            raise ValueError("ShapesData: the captions lack the one-object or two-object set the fractions ask for")

    @classmethod
    def from_world(cls, encoder, resolution: int = 32, two_object_fraction: float = 0.25,
                   cache: str | Path | None = None, progress: bool = False, max_captions: int = 0) -> ShapesData:
        """The training captions (one- and two-object) of the world, encoded by `encoder` (cached in `cache`);
        with `max_captions`, an evenly spaced subset of at most that many per set."""
        sets = [caption_set(1, "train")] + ([caption_set(2, "train")] if two_object_fraction > 0 else [])
        if max_captions:
            sets = [pairs[::max(1, -(-len(pairs) // max_captions))] for pairs in sets]
        pairs = [pair for pairs in sets for pair in pairs]
        captions = [caption for caption, _ in pairs]
        bank, uncond = encode_cached(encoder, captions, cache, progress)
        return cls(captions, [spec for _, spec in pairs], bank, uncond, resolution, two_object_fraction)

    def sample(self, batch_size: int, rng: torch.Generator) -> tuple[Tensor, Conditioning]:
        """Draws everything from `rng` (checkpointed by the caller), so a resumed run continues the same stream."""
        two = torch.rand(batch_size, generator=rng) < self.two_object_fraction
        pick_one = self.one_index[torch.randint(len(self.one_index), (batch_size,), generator=rng)]
        index = pick_one
        if len(self.two_index):
            pick_two = self.two_index[torch.randint(len(self.two_index), (batch_size,), generator=rng)]
            index = torch.where(two, pick_two, pick_one)
        scene_rng = random.Random(int(torch.randint(2**62, (1,), generator=rng)))
        images = render_batch([sample_scene(self.specs[i], scene_rng, self.resolution) for i in index.tolist()])
        return images, self.bank[index].to(dtype=torch.float32)

    def unconditional(self, batch_size: int) -> Conditioning:
        return self.uncond.to(dtype=torch.float32).expand_to(batch_size)
