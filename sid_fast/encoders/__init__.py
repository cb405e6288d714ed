"""Prompt encoding per teacher family through each diffusers pipeline's own `encode_prompt` (DESIGN.md §1),
and the condition source that serves encoded prompts to the trainer."""

from sid_fast.encoders.conditions import EmbeddingConditions, read_prompts
from sid_fast.encoders.pipeline_encoder import PromptEncoder

__all__ = ["EmbeddingConditions", "PromptEncoder", "read_prompts"]
