"""SiD distillation of FLUX.1-dev under DeepSpeed ZeRO-3 (preset configs/flux_large.yaml + configs/flux_large.json).

    deepspeed --num_gpus 8 launchers/flux_large.py --teacher.path /models/<local FLUX.1-dev diffusers directory> \
        --teacher.prompts prompts.txt [--section.field=value ...] [--dry-run]

LoRA fake score (`--teacher.fake_lora_rank=64`): the fake score is the teacher's partitioned base plus LoRA adapters,
one copy of the frozen base serves both, and only the adapters have gradients and Adam states; `--dry-run` prints the
planned memory and the fewest 80 GB GPUs for it (`sid-fast plan --teacher ... --min-gpus --fake-lora-rank 64`).
By the planner, FLUX.1-dev at 1024 px, micro-batch 1, activation checkpointing: 4 × 80 GB with LoRA rank 64 (68.7 GiB
per GPU) against 7 with three full copies (8 = one node, 65.8 GiB per GPU):

    deepspeed --num_gpus 4 launchers/flux_large.py --teacher.path ... --teacher.fake_lora_rank=64 --train.grad_accum=64
"""

import sys

from common import main

from sid_fast.engine.planner import MODELS

if __name__ == "__main__":
    sys.exit(main("flux_large", lambda: MODELS["flux-dev"]))
