"""Worker for tests/test_adversarial.py: §5 discriminator logits (and their input gradient) of a fake score held by
the DeepSpeed ZeRO-3 engine, on a fixed input; rank r writes logits-rank{r}.safetensors.

    torchrun --nproc_per_node N tests/adversarial_worker.py OUT [--section.field=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sid_fast.adversarial import velocity_and_logits
from sid_fast.config import load_config
from sid_fast.engine.build import build_engine
from sid_fast.models.registry import build_teacher

BASE = ["engine.kind=deepspeed", "engine.persistence_threshold=0", "engine.optimizer=torch", "teacher.kind=sd3",
        "teacher.preset=tiny", "train.batch_size=3", "train.progress=false"]


def fixed_input(bundle, batch: int = 3):
    """The same (x_t, t, cond) on every rank and in every run."""
    g = torch.Generator().manual_seed(99)
    x_t = torch.randn((batch, *bundle.sample_shape), generator=g)
    t = torch.rand(batch, generator=g)
    return x_t, t, bundle.conditions.sample(batch, g)


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    config = load_config(None, BASE + [f"train.out_dir={out}"] + argv[1:])
    bundle = build_teacher(config.teacher)
    engine = build_engine(config, bundle)
    x_t, t, cond = fixed_input(bundle)
    x_t = x_t.to(engine.device).requires_grad_(True)
    with engine.frozen("fake_score"):  # as in the generator step: input gradients only
        velocity, logits = velocity_and_logits(engine.fake_score, x_t, t.to(engine.device), cond.to(engine.device))
        (grad,) = torch.autograd.grad(logits.sum(), x_t)
    save_file({"logits": logits.detach().cpu().contiguous(), "velocity": velocity.detach().cpu().contiguous(),
               "grad": grad.cpu().contiguous()}, out / f"logits-rank{engine.rank}.safetensors")
    engine.barrier()


if __name__ == "__main__":
    main([arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")])
