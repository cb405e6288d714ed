"""Engines hold and step the three networks: `LocalEngine` (one process); DeepSpeed ZeRO-3 lives beside it."""

from sid_fast.engine.base import EMA, Engine, requires_grad_off
from sid_fast.engine.local import LocalEngine

__all__ = ["EMA", "Engine", "LocalEngine", "requires_grad_off"]
