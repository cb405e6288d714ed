"""sid_fast: Score identity Distillation of flow-matching text-to-image transformers into 1–4-step generators."""

from sid_fast.api import Distilled, distill
from sid_fast.config import SiDConfig, load_config
from sid_fast.models.protocol import Conditioning, ConditionSource, VelocityModel

__all__ = ["Conditioning", "ConditionSource", "Distilled", "SiDConfig", "VelocityModel", "distill", "load_config"]
__version__ = "0.1.0"
