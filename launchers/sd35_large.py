"""SiD distillation of SD3.5-Large under DeepSpeed ZeRO-3 (preset configs/sd35_large.yaml + configs/sd35_large.json).

    deepspeed --num_gpus 8 launchers/sd35_large.py --teacher.path /models/<local SD3.5-Large diffusers directory> \
        --teacher.prompts prompts.txt [--section.field=value ...] [--dry-run]

LoRA fake score (`--teacher.fake_lora_rank=64`): the fake score is the teacher's partitioned base plus LoRA adapters,
one copy of the frozen base serves both, and only the adapters have gradients and Adam states; `--dry-run` prints the
planned memory and the fewest 80 GB GPUs for it (`sid-fast plan --teacher ... --min-gpus --fake-lora-rank 64`).
By the planner, SD3.5-Large at 1024 px, micro-batch 1, activation checkpointing: 3 × 80 GB with LoRA rank 64 against 5
with three full copies.
"""

import sys

from common import main

from sid_fast.engine.planner import MODELS

if __name__ == "__main__":
    sys.exit(main("sd35_large", lambda: MODELS["sd35-large"]))
