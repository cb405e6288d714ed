"""The embedded default (exact 8-mode ring teacher, §9) under DeepSpeed ZeRO-3: a multi-process smoke run on CPU.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/default.py --train.iterations=200
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 launchers/default.py --train.iterations=200
"""

import sys

from common import main


def plan_spec():
    """Count the student VelocityMLP on the meta device (no fitting, no weights)."""
    import torch

    from sid_fast.engine.planner import spec_from_module
    from sid_fast.models.mlp import VelocityMLP

    with torch.device("meta"):
        student = VelocityMLP(2, hidden=256, depth=3)
    return spec_from_module(student, "ring8 VelocityMLP", hidden=256, blocks=3, text_tokens=0, latent_factor=1024)


if __name__ == "__main__":
    from pathlib import Path

    ring8 = Path(__file__).resolve().parents[1] / "sid_fast" / "presets" / "mixture_ring8.yaml"
    sys.exit(main("default", plan_spec, base_yaml=ring8))
