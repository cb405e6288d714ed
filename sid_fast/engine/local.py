"""Single-process engine: plain modules on one device, torch Adam, gradient accumulation, EMA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sid_fast.config import OptimConfig
from sid_fast.engine.base import EMA, TRAINABLE, frozen_network, release_frozen

__all__ = ["LocalEngine"]


def adam_kwargs(implementation: str, device: torch.device) -> dict:
    """torch.optim.Adam's implementation switch for optim.implementation (auto: fused on CUDA, else the per-parameter
    loop, torch's own CPU default, which keeps CPU runs bit-identical to earlier versions)."""
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "single"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}[implementation]


def _adam(module: nn.Module, lr: float, optim: OptimConfig, device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(
        [p for p in module.parameters() if p.requires_grad],
        lr=lr,
        betas=(float(optim.beta1), float(optim.beta2)),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        **adam_kwargs(optim.implementation, device),
    )


def enable_activation_checkpointing(module: nn.Module, name: str, function=None) -> None:
    """Switch on block recomputation in the diffusers model inside network `name` (`function`: the checkpoint
    function; None: diffusers' default, torch's non-reentrant checkpoint)."""
    for sub in module.modules():
        if hasattr(sub, "enable_gradient_checkpointing"):
            sub.enable_gradient_checkpointing(gradient_checkpointing_func=function)
            return
    raise ValueError(f"config field engine.activation_checkpointing: the {name} ({type(module).__name__}) has no "
                     "`enable_gradient_checkpointing`; switch it off for this model or leave it out of "
                     "engine.checkpoint_networks")


def _contiguous_state(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().contiguous().cpu() for name, value in module.state_dict().items()}


class LocalEngine:
    """Holds teacher, fake score and generator on one device.

    The teacher is frozen (requires_grad off, eval mode). `grad_accum` micro-batches make one update;
    the loss of each micro-batch is divided by `grad_accum` in `backward`. `checkpointed`: networks whose blocks
    recompute their activations in backward (diffusers models; engine.activation_checkpointing).
    """

    rank = 0
    world_size = 1

    def __init__(self, teacher: nn.Module, fake_score: nn.Module, generator: nn.Module, optim: OptimConfig,
                 grad_accum: int = 1, ema_decay: float = 0.0, device: str | torch.device = "cpu",
                 checkpointed: tuple[str, ...] = ()):
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.fake_score = fake_score.to(self.device).train()
        self.generator = generator.to(self.device).train()
        for name in checkpointed:
            enable_activation_checkpointing(self.network(name), name)
        self.checkpointed = tuple(checkpointed)
        self._frozen_until_backward: dict[str, list] = {}
        self.optim_config = optim
        self.grad_accum = grad_accum
        self.optimizers = {
            "fake_score": _adam(self.fake_score, optim.lr_fake, optim, self.device),
            "generator": _adam(self.generator, optim.lr_generator, optim, self.device),
        }
        self.micro_steps = {name: 0 for name in TRAINABLE}
        self.updates = {name: 0 for name in TRAINABLE}
        self.ema = EMA(self.generator, ema_decay) if ema_decay > 0 else None
        self._ema_module: nn.Module | None = None

    def network(self, name: str) -> nn.Module:
        if name not in ("teacher", *TRAINABLE):
            raise ValueError(f"unknown network {name!r}")
        return getattr(self, name)

    def backward(self, name: str, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()
        release_frozen(self._frozen_until_backward)  # recomputed blocks ran frozen: now unfreeze

    def step(self, name: str) -> dict:
        self.micro_steps[name] += 1
        if self.micro_steps[name] % self.grad_accum:
            return {}
        module, optimizer = self.network(name), self.optimizers[name]
        params = [p for p in module.parameters() if p.grad is not None]
        clip = self.optim_config.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))  # foreach, no host sync
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.updates[name] += 1
        return {"grad_norm": norm.detach()}  # a device scalar; the trainer reads it with the log line

    def frozen(self, name: str):
        """No weight gradients for `name` (input gradients flow, §3). A checkpointed network recomputes its
        blocks inside the next backward, so it stays frozen until that backward completes (the recomputation
        must save what the frozen forward saved)."""
        held = self._frozen_until_backward if name in self.checkpointed else None
        return frozen_network(self.network(name), name, held)

    def ema_update(self) -> None:
        if self.ema is not None:
            self.ema.update(self.generator)

    def sampling_generator(self, ema: bool = True) -> nn.Module:
        if not ema or self.ema is None:
            return self.generator
        if self._ema_module is None:
            self._ema_module = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.ema.copy_to(self._ema_module)
        return self._ema_module

    def generator_state_dict(self, ema: bool = True) -> dict[str, Tensor]:
        return _contiguous_state(self.sampling_generator(ema))

    # ------------------------------------------------------------------ checkpoint state

    def save_state(self, directory: Path) -> None:
        directory = Path(directory)
        save_file(_contiguous_state(self.generator), directory / "generator.safetensors")
        save_file(_contiguous_state(self.fake_score), directory / "fake_score.safetensors")
        if self.ema is not None:
            save_file({k: v.contiguous() for k, v in self.ema.shadow.items()}, directory / "generator_ema.safetensors")
        torch.save({name: opt.state_dict() for name, opt in self.optimizers.items()}, directory / "optimizers.pt")
        meta = {"micro_steps": self.micro_steps, "updates": self.updates,
                "ema_updates": self.ema.updates if self.ema is not None else None}
        (directory / "engine.json").write_text(json.dumps(meta))

    def load_state(self, directory: Path) -> None:
        directory = Path(directory)
        self.generator.load_state_dict(load_file(directory / "generator.safetensors", device=str(self.device)))
        self.fake_score.load_state_dict(load_file(directory / "fake_score.safetensors", device=str(self.device)))
        optim_states = torch.load(directory / "optimizers.pt", map_location=self.device, weights_only=True)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(optim_states[name])
        meta = json.loads((directory / "engine.json").read_text())
        self.micro_steps, self.updates = meta["micro_steps"], meta["updates"]
        if self.ema is not None:
            ema_file = directory / "generator_ema.safetensors"
            if not ema_file.exists():
                raise FileNotFoundError(f"{ema_file}: EMA is on but the checkpoint has no EMA weights")
            self.ema.shadow = load_file(ema_file, device=str(self.device))
            self.ema.updates = meta["ema_updates"] or 0

    # ------------------------------------------------------------------ collectives (trivial here)

    def barrier(self) -> None:
        return None

    def all_reduce_mean(self, value: Tensor) -> Tensor:
        return value
