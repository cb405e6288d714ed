"""SiD distillation of FLUX.1-dev under DeepSpeed ZeRO-3 (preset configs/flux_large.yaml + configs/flux_large.json).

    deepspeed --num_gpus 8 launchers/flux_large.py --teacher.path /models/<local FLUX.1-dev diffusers directory> \
        --teacher.prompts prompts.txt [--section.field=value ...] [--dry-run]
"""

import sys

from common import main

from sid_fast.engine.planner import MODELS

if __name__ == "__main__":
    sys.exit(main("flux_large", lambda: MODELS["flux-dev"]))
