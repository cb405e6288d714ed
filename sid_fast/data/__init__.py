"""Shards of prompts, text embeddings and latents: `prepare` writes them, `ShardConditions` streams them.

    from sid_fast.data import prepare_prompts, ShardConditions
    prepare_prompts("prompts.txt", "shards/", encoder)              # encoder: a PromptEncoder (encoding.py)
    conditions = ShardConditions("shards/", teacher_id=encoder.teacher_id, num_workers=2, seed=0)

See docs/data.md for the format, the commands and measured throughput.
"""

from sid_fast.data.conditions import ShardBatch, ShardConditions, build_conditions, resolve_rank
from sid_fast.data.encoding import (
    LatentEncoder,
    PromptEncoder,
    VAELatentEncoder,
    build_encoders,
    load_image,
    teacher_id,
)
from sid_fast.data.format import BadSample, ShardError, ShardManifest, check_teacher
from sid_fast.data.loader import BadDataError, ShardStream
from sid_fast.data.prepare import prepare_images, prepare_prompts

__all__ = [
    "BadDataError", "BadSample", "LatentEncoder", "PromptEncoder", "ShardBatch", "ShardConditions", "ShardError",
    "ShardManifest", "ShardStream", "VAELatentEncoder", "build_conditions", "build_encoders", "check_teacher",
    "load_image", "prepare_images", "prepare_prompts", "resolve_rank", "teacher_id",
]
