"""SiD distillation of SD3-Medium under DeepSpeed ZeRO-3 (preset configs/sd3_medium.yaml + configs/sd3_medium.json).

    deepspeed --num_gpus 8 launchers/sd3_medium.py --teacher.path /models/<local SD3-Medium diffusers directory> \
        --teacher.prompts prompts.txt [--section.field=value ...] [--dry-run]
"""

import sys

from common import main

from sid_fast.engine.planner import MODELS

if __name__ == "__main__":
    sys.exit(main("sd3_medium", lambda: MODELS["sd3-medium"]))
