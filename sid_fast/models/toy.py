"""The `mixture` teacher family: exact Gaussian-mixture teachers (§9) with a learned MLP as the student init.

Presets (teacher.preset):
  ring8        8-mode ring in 2-D, radius 2, std 0.2, unconditional
  ring8-cond4  the same ring, 4 classes owning opposite mode pairs (class-conditional, for CFG)
  mix5d-cond3  6 random modes in 5-D, 3 classes
The student (generator and fake-score initialisation) is a VelocityMLP fitted by flow matching to the
mixture for a short while, so it is a copy of an imperfect learned teacher, as with real models.
"""

from __future__ import annotations

import torch

from sid_fast.models.mixture import LabelConditions, MixtureRealData, MixtureTeacher, random_mixture, ring_mixture
from sid_fast.models.mlp import VelocityMLP
from sid_fast.models.registry import TeacherBundle, register_family
from sid_fast.pretrain import fit_flow_matching

PRESETS = {
    "ring8": dict(make=lambda: ring_mixture(8, 2.0, 0.2), classes=0),
    "ring8-cond4": dict(make=lambda: ring_mixture(8, 2.0, 0.2, num_classes=4), classes=4),
    "mix5d-cond3": dict(make=lambda: random_mixture(6, 5, num_classes=3, seed=0), classes=3),
}


def make_student(mixture, num_classes: int, hidden: int = 256, depth: int = 3, fit_steps: int = 800, seed: int = 0) -> VelocityMLP:
    """A VelocityMLP fitted to the mixture by flow matching for `fit_steps` steps (deterministic for a seed)."""
    torch.manual_seed(seed)
    student = VelocityMLP(mixture.dim, hidden=hidden, depth=depth, num_classes=num_classes)
    conditions = LabelConditions(num_classes)

    def sample_data(n: int, rng: torch.Generator):
        cond = conditions.sample(n, rng)
        return mixture.sample(n, cond.labels, generator=rng), cond

    fit_flow_matching(student, sample_data, conditions.unconditional, fit_steps, batch_size=256, lr=2e-3, seed=seed)
    return student


def build_mixture(config) -> TeacherBundle:
    preset = config.preset or "ring8"
    if preset not in PRESETS:
        raise ValueError(f"config field teacher.preset: unknown mixture preset {preset!r}; known: {sorted(PRESETS)}")
    spec = PRESETS[preset]
    mixture = spec["make"]()
    student = make_student(mixture, spec["classes"])
    return TeacherBundle(MixtureTeacher(mixture), student, LabelConditions(spec["classes"]), (mixture.dim,), reference=mixture,
                         real_data=lambda conditions, seed: MixtureRealData(mixture, conditions, seed=seed))


register_family("mixture", build_mixture)
