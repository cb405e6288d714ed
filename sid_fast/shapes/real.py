"""Real data of data-aided SiD²ₐ (DESIGN.md §5) on ShapesWorld: scenes rendered for the prompt shards' own captions.

ShapesWorld has no image shards: its "real images" are the renderer's. `ShapesRealData` reads every (caption,
conditioning) record of the prompt shards once (the MiniLM encodings `sid-fast prepare prompts` stored, in their
stored layout and dtype, so real and fake batches concatenate), parses each caption back to its spec, and per batch
draws captions uniformly and renders a fresh random scene for each (parse_caption -> sample_scene -> render).

    real = ShapesRealData.from_shards("runs/shapes-prompts", seed=1)
    x0, cond = real.sample_with_latents(16)        # (16, 3, 32, 32) float32 in [-1, 1], their captions' Conditioning

Every draw comes from one torch generator per rank (seeded by (seed, rank)); `state_dict()` holds it (every rank's,
gathered under torch.distributed like the shard loader's), so a resumed run draws the same next batch.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.data.conditions import resolve_rank
from sid_fast.data.format import ShardError, ShardManifest, check_teacher
from sid_fast.data.loader import ShardStream, mix_seed
from sid_fast.models.protocol import Conditioning
from sid_fast.shapes.captions import parse_caption
from sid_fast.shapes.world import PromptSpec, render_batch, sample_scene

COND_FIELDS = ("embeds", "pooled", "mask")


def read_prompt_shards(directory: str | Path, teacher_id: str | None = None) -> tuple[list[str], Conditioning]:
    """(captions, Conditioning of batch N) of every record of a prompt-shard directory, in sample-key order, in the
    stored dtypes. Refuses shards of another teacher (`teacher_id`) and bad records (naming the shard)."""
    directory = Path(directory)
    manifest = ShardManifest.load(directory)
    if teacher_id is not None:
        check_teacher(manifest, teacher_id, directory)
    fields = [name for name in COND_FIELDS if name in manifest.fields]
    if not fields:
        raise ShardError(f"{directory}: the shards hold no caption encodings ({sorted(manifest.fields)})")
    stream = ShardStream(directory, shuffle_buffer=0, max_bad_fraction=0.0, manifest=manifest)
    records = sorted(stream.iter_epoch(), key=lambda sample: sample["key"])
    stream.close()
    if not records:
        raise ShardError(f"{directory}: no samples")
    bank = Conditioning(**{name: torch.stack([r[name] for r in records]) for name in fields})
    return [r["prompt"] for r in records], bank


class ShapesRealData:
    """`sample_with_latents(batch)` -> (x0 (B, 3, R, R) float32 in [-1, 1], Conditioning of batch B), the ShapesWorld
    analogue of `sid_fast.adversarial.MixtureRealData`.

    captions: N ShapesWorld captions (each parsed by `parse_caption`; a caption outside the grammar is an error
    naming it); bank: their conditioning, batch N, returned as stored (bfloat16 from prompt shards);
    rank/world_size: explicit, else torch.distributed's (each rank draws its own stream).
    """

    def __init__(self, captions: list[str], bank: Conditioning, resolution: int = 32, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        if not captions:
            raise ValueError("ShapesRealData: no captions")
        if len(captions) != len(bank):
            raise ValueError(f"ShapesRealData: {len(captions)} captions for {len(bank)} encodings")
        self.captions, self.bank, self.resolution, self.seed = list(captions), bank, resolution, seed
        self.specs: list[PromptSpec] = []
        for caption in self.captions:
            try:
                self.specs.append(parse_caption(caption))
            except ValueError as error:
                raise ValueError(f"ShapesRealData renders real images for ShapesWorld captions only: {error}") from None
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.rng = torch.Generator().manual_seed(mix_seed(seed, self.rank) % 2**63)

    @classmethod
    def from_shards(cls, directory: str | Path, teacher_id: str | None = None, **kwargs) -> ShapesRealData:
        """From a prompt-shard directory (`sid-fast prepare prompts ... --encoder shapes`)."""
        captions, bank = read_prompt_shards(directory, teacher_id)
        return cls(captions, bank, **kwargs)

    @classmethod
    def from_conditions(cls, conditions, **kwargs) -> ShapesRealData:
        """From a training condition source: `ShardConditions` (its directory) or an `EmbeddingConditions` with its
        prompt texts (teacher.prompts); a clear error naming data.shards for anything else."""
        directory = getattr(conditions, "directory", None)
        if directory is not None:
            return cls.from_shards(directory, **kwargs)
        bank, prompts = getattr(conditions, "bank", None), getattr(conditions, "prompts", None)
        if bank is not None and prompts is not None:
            return cls(prompts, bank, **kwargs)
        raise ValueError("config field data.shards: data-aided SiD on ShapesWorld renders real images for the "
                         "training captions; give prompt shards (`sid-fast prepare prompts ... --encoder shapes`) "
                         "or teacher.prompts")

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, batch_size: int) -> tuple[Tensor, Conditioning, list[str]]:
        """(images, conditioning, captions) of `batch_size` captions drawn uniformly, one fresh scene each."""
        index = torch.randint(len(self.captions), (batch_size,), generator=self.rng)
        scene_rng = random.Random(int(torch.randint(2**62, (1,), generator=self.rng)))
        picks = index.tolist()
        images = render_batch([sample_scene(self.specs[i], scene_rng, self.resolution) for i in picks])
        return images, self.bank[index], [self.captions[i] for i in picks]

    def sample_with_latents(self, batch_size: int) -> tuple[Tensor, Conditioning]:
        images, cond, _ = self.sample(batch_size)
        return images, cond

    def state_dict(self) -> dict:
        """{"seed", "count", "ranks": {rank: rng state}}; every rank's under torch.distributed (rank 0 saves it)."""
        mine = self.rng.get_state().tolist()
        ranks = {str(self.rank): mine}
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
            ranks = {str(r): s for r, s in enumerate(gathered)}
        return {"seed": self.seed, "count": len(self.captions), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("seed") != self.seed or state.get("count") != len(self.captions):
            raise ValueError(f"real-data state was saved with seed {state.get('seed')} and {state.get('count')} "
                             f"captions, this run has seed {self.seed} and {len(self.captions)}; resume with the same data")
        if str(self.rank) not in state["ranks"]:
            raise ValueError(f"real-data state has no entry for rank {self.rank} (has {sorted(state['ranks'])})")
        self.rng.set_state(torch.tensor(state["ranks"][str(self.rank)], dtype=torch.uint8))
