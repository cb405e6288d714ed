"""SiD distillation of SD3.5-Large under DeepSpeed ZeRO-3 (preset configs/sd35_large.yaml + configs/sd35_large.json).

    deepspeed --num_gpus 8 launchers/sd35_large.py --teacher.path /models/<local SD3.5-Large diffusers directory> \
        --teacher.prompts prompts.txt [--section.field=value ...] [--dry-run]
"""

import sys

from common import main

from sid_fast.engine.planner import MODELS

if __name__ == "__main__":
    sys.exit(main("sd35_large", lambda: MODELS["sd35-large"]))
