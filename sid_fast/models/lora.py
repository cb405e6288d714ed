"""The LoRA fake score (DESIGN.md §7: users who cannot hold three full copies): the teacher's network with
LoRA adapters on its attention projections, the teacher's weights shared (not copied), only the adapters trained.

Memory: a full fake score costs, per teacher parameter, its weight + gradient + two Adam moments (4 copies in
fp32 master precision); the LoRA fake score costs only the adapters' share of that (rank·(d_in + d_out) per
adapted matrix). The teacher's frozen weights are referenced, never duplicated — in one process (LocalEngine) and
under DeepSpeed ZeRO-3, where the engine partitions the shared base once (sid_fast/engine/zero3.py).

    fake_score = make_lora_fake_score(teacher, rank=16)
    engine = LocalEngine(teacher, fake_score, generator, optim)   # its Adam sees only the LoRA parameters

`adapters_disabled(fake_score)` runs the fake score as its base network (peft's own switch,
`BaseTunerLayer.enable_adapters`, the one `PeftModel.disable_adapter()` uses), which is the teacher bit for bit.
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Attention projections shared by SD3, FLUX and SANA transformers (diffusers naming)."""


def _matches(name: str, target: str) -> bool:
    """peft's rule for a target given as a name: the module's full name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


def resolve_targets(module: nn.Module, target_modules: tuple[str, ...] | None = None) -> list[str]:
    """The target names LoRA adapters go on in `module`.

    None: the attention projections (DEFAULT_TARGETS) when the model has them, else every nn.Linear by full name
    (small models without attention, e.g. VelocityMLP). Explicit names that match no linear layer are an error."""
    linears = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
    wanted = DEFAULT_TARGETS if target_modules is None else tuple(target_modules)
    present = [target for target in wanted if any(_matches(name, target) for name in linears)]
    if present:
        return present
    if target_modules is None and linears:
        return linears
    raise ValueError(f"make_lora_fake_score: none of {list(wanted)} is a linear layer of {type(module).__name__}")


def lora_params_per_rank(module: nn.Module, target_modules: tuple[str, ...] | None = None) -> int:
    """Adapter parameters per unit of rank that `make_lora_fake_score` adds to `module`: Σ (d_in + d_out) over the
    adapted linear layers (A is r × d_in, B is d_out × r). Works on a model built on the meta device."""
    targets = resolve_targets(module, target_modules)
    return sum(sub.in_features + sub.out_features for name, sub in module.named_modules()
               if isinstance(sub, nn.Linear) and any(_matches(name, target) for target in targets))


def make_lora_fake_score(teacher: nn.Module, rank: int, alpha: float | None = None,
                         target_modules: tuple[str, ...] | None = None, seed: int = 0) -> nn.Module:
    """A fake score = `teacher` + LoRA(rank) adapters; shares every teacher parameter and buffer.

    The returned module is a structural copy of `teacher` whose tensors are the teacher's own (no new memory);
    peft LoRA layers wrap its target linears (`resolve_targets`). Base weights keep requires_grad False; LoRA
    weights are trainable, B initialised to zero so the fake score starts equal to the teacher (SiD's
    initialisation). A is drawn from an RNG seeded with `seed` (the global RNG is left as it was), so every rank
    of a distributed run, and every rerun, builds the same adapters.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = resolve_targets(teacher, target_modules)
    memo = {id(tensor): tensor for tensor in [*teacher.parameters(), *teacher.buffers()]}
    fake_score = copy.deepcopy(teacher, memo)  # new modules, the teacher's tensors
    fake_score.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights=True)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        fake_score = inject_adapter_in_model(config, fake_score)
    for name, parameter in fake_score.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return fake_score.train()


def lora_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    """peft's tuner layers (LoRA-wrapped linears) inside `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [sub for sub in module.modules() if isinstance(sub, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Within the context `module` computes as its base network: every tuner layer switched off through peft's
    `enable_adapters(False)` (what `PeftModel.disable_adapter()` does). On exit the adapters are switched back on
    and each parameter's requires_grad flag is restored (peft's re-enable would mark every adapter trainable, which
    would undo an engine's `frozen` context)."""
    layers = adapter_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to disable")
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


def split_shared(teacher: nn.Module, fake_score: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(base, own): the fake score's parameters that are the teacher's (the same objects), and its own.
    An empty base means a full fake-score copy."""
    base_ids = {id(p) for p in teacher.parameters()}
    base, own = [], []
    for p in fake_score.parameters():
        (base if id(p) in base_ids else own).append(p)
    return base, own
