"""SiD distillation of SD3.5-Medium under DeepSpeed ZeRO-3 (preset configs/sd35_medium.yaml + configs/sd35_medium.json).

    deepspeed --num_gpus 8 launchers/sd35_medium.py --teacher.path /models/<local SD3.5-Medium diffusers directory> \
        --teacher.prompts prompts.txt [--section.field=value ...] [--dry-run]
"""

import sys

from common import main

from sid_fast.engine.planner import MODELS

if __name__ == "__main__":
    sys.exit(main("sd35_medium", lambda: MODELS["sd35-medium"]))
