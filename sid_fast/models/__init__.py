"""Teacher adapters behind one protocol (see `protocol.py`), and the toy models."""

from sid_fast.models.mixture import GaussianMixture, LabelConditions, MixtureTeacher, random_mixture, ring_mixture
from sid_fast.models.mlp import VelocityMLP
from sid_fast.models.protocol import Conditioning, ConditionSource, VelocityModel

__all__ = ["Conditioning", "ConditionSource", "GaussianMixture", "LabelConditions", "MixtureTeacher", "VelocityMLP",
           "VelocityModel", "random_mixture", "ring_mixture"]
