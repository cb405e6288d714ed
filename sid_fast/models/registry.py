"""Teacher families by name. A family builder turns a `TeacherConfig` into a `TeacherBundle`:
the frozen teacher, the network the generator and fake score are copied from, a condition source
and the latent shape. Real families (sd3, flux, sana, shapes) register themselves beside the toy one."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from sid_fast.models.protocol import ConditionSource


@dataclass
class TeacherBundle:
    teacher: nn.Module
    """Frozen teacher velocity model."""
    student: nn.Module | None
    """Initialisation of generator and fake score (None: copies of the teacher)."""
    conditions: ConditionSource | None
    """Where training conditionings come from (None: prepared shards must be given as data.shards)."""
    sample_shape: tuple[int, ...]
    """Per-sample latent shape."""
    reference: object | None = None
    """Optional ground truth for evaluation (e.g. the exact mixture)."""
    real_data: Callable | None = None
    """The family's own real data for SiD²ₐ (§5): `(conditions, seed) -> source` with `sample_with_latents(batch)`
    (ShapesWorld renders scenes for the captions, the exact mixture samples itself); None: image shards
    (`sid-fast prepare images`, data.shards) are the real data."""


_FAMILIES: dict[str, Callable] = {}
# families whose module registers them on import
_LAZY = {"mixture": "sid_fast.models.toy", "sd3": "sid_fast.models.diffusers_family",
         "flux": "sid_fast.models.diffusers_family", "sana": "sid_fast.models.diffusers_family",
         "shapes": "sid_fast.models.shapes"}


def register_family(name: str, builder: Callable) -> None:
    _FAMILIES[name] = builder


def build_teacher(config) -> TeacherBundle:
    """Build the bundle for `config` (a TeacherConfig); the error names the field when the family is unknown."""
    if config.kind not in _FAMILIES and config.kind in _LAZY:
        importlib.import_module(_LAZY[config.kind])
    if config.kind not in _FAMILIES:
        known = sorted(set(_FAMILIES) | set(_LAZY))
        raise ValueError(f"config field teacher.kind: unknown teacher family {config.kind!r}; known: {known}")
    return _FAMILIES[config.kind](config)
