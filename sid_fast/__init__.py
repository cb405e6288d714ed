"""sid_fast: Score identity Distillation of flow-matching text-to-image transformers into 1–4-step generators."""

from pathlib import Path as _Path

# setup.py installs the checkout's kernels/ as sid_fast.kernels; run from a checkout without installing (the GPU
# scripts, the launchers), the same folder is found through this package's search path.
if not (_Path(__file__).parent / "kernels").exists() and (_Path(__file__).parents[1] / "kernels" / "__init__.py").is_file():
    __path__.append(str(_Path(__file__).parents[1]))

from sid_fast.api import Distilled, distill  # noqa: E402
from sid_fast.config import SiDConfig, load_config  # noqa: E402
from sid_fast.models.protocol import Conditioning, ConditionSource, VelocityModel  # noqa: E402

__all__ = ["Conditioning", "ConditionSource", "Distilled", "SiDConfig", "VelocityModel", "distill", "load_config"]
__version__ = "0.1.0"
