"""SiD distillation of SANA 1.6B under DeepSpeed ZeRO-3 (preset configs/sana.yaml + configs/sana.json).

    deepspeed --num_gpus 8 launchers/sana.py --teacher.path /models/<local SANA 1.6B diffusers directory> \
        --teacher.prompts prompts.txt [--section.field=value ...] [--dry-run]
"""

import sys

from common import main

from sid_fast.engine.planner import MODELS

if __name__ == "__main__":
    sys.exit(main("sana", lambda: MODELS["sana-1.6b"]))
