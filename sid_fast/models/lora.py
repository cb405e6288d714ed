"""The LoRA fake score (DESIGN.md §7: users who cannot hold three full copies): the teacher's network with
LoRA adapters on its attention projections, the teacher's weights shared (not copied), only the adapters trained.

Memory: a full fake score costs, per teacher parameter, its weight + gradient + two Adam moments (4 copies in
fp32 master precision); the LoRA fake score costs only the adapters' share of that (rank·(d_in + d_out) per
adapted matrix). The teacher's frozen weights are referenced, never duplicated.

    fake_score = make_lora_fake_score(teacher, rank=16)
    engine = LocalEngine(teacher, fake_score, generator, optim)   # its Adam sees only the LoRA parameters
"""

from __future__ import annotations

import copy

from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Attention projections shared by SD3, FLUX and SANA transformers (diffusers naming)."""


def make_lora_fake_score(teacher: nn.Module, rank: int, alpha: float | None = None,
                         target_modules: tuple[str, ...] = DEFAULT_TARGETS) -> nn.Module:
    """A fake score = `teacher` + LoRA(rank) adapters; shares every teacher parameter and buffer.

    The returned module is a structural copy of `teacher` whose tensors are the teacher's own (no new memory);
    peft LoRA layers wrap its target linears. Base weights keep requires_grad False; LoRA weights are
    trainable, B initialised to zero so the fake score starts equal to the teacher (SiD's initialisation).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    memo = {id(tensor): tensor for tensor in [*teacher.parameters(), *teacher.buffers()]}
    fake_score = copy.deepcopy(teacher, memo)  # new modules, the teacher's tensors
    fake_score.requires_grad_(False)
    names = {name.split(".")[-1] for name, _ in fake_score.named_modules()}
    present = [target for target in target_modules if target.split(".")[-1] in names]
    if not present:
        raise ValueError(f"make_lora_fake_score: none of {target_modules} is a module of {type(teacher).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules),
                        init_lora_weights=True)
    fake_score = inject_adapter_in_model(config, fake_score)
    for name, parameter in fake_score.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return fake_score.train()


def lora_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)
