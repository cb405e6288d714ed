"""`install_block_kernels`: switch the norm/modulation modules and FLUX attention processors of a diffusers
transformer (SD3/SD3.5, FLUX, SANA) to the DiT block ops of the registry, without editing model code.

    report = install_block_kernels(transformer, backend="triton")   # or "torch": the references, bit-equal
    print(report)            # what was switched, what was left and why
    uninstall_block_kernels(transformer)

Each matching module keeps its identity: only its class is swapped for a subclass whose forward calls the ops
(kernels/diffusers_blocks.py), so parameters, state-dict keys, hooks (ZeRO-3, FSDP) and peft adapters are
untouched and the swap can be undone. What is not switched: the gated residuals x + gate · y and the
second-norm modulations that diffusers writes inline in the block forwards (no module to swap; the ops
`gated_residual` and `adaln_modulation` are there for model code that wants them), norms with affine parameters or
bias, and any class that is a subclass rather than the exact diffusers class.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from sid_fast.kernels.registry import backends

log = logging.getLogger("sid_fast.kernels")

INSTALLABLE_OPS = ("adaln_modulation", "rms_norm", "rotary_qk")
"""Op groups the installer can switch (`rms_norm` covers RMSNorm with and without weight)."""

REGISTRY_OPS = ("adaln_modulation", "rms_norm", "weighted_rms_norm", "rotary_qk")
"""The registry ops the swapped modules call: a backend must be registered for all of them."""

_ORIGINAL = "_sid_fast_original_class"


@dataclass
class BlockKernelReport:
    """What `install_block_kernels` did: counts per `Class -> op`, and modules left alone with the reason."""

    backend: str
    swapped: Counter = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.swapped.values())

    def __str__(self) -> str:
        parts = [f"{count} {what}" for what, count in sorted(self.swapped.items())]
        text = f"block kernels ({self.backend}): {self.total} swapped" + (f" [{', '.join(parts)}]" if parts else "")
        if self.skipped:
            reasons = Counter(self.skipped.values())
            text += "; left as is: " + ", ".join(f"{n} ({reason})" for reason, n in sorted(reasons.items()))
        return text


def _check(backend: str, ops) -> tuple[str, ...]:
    if not all(backend in backends(op) for op in REGISTRY_OPS):
        raise ValueError(f"unknown block kernel backend {backend!r}; expected torch, triton or a backend registered "
                         "for every block op")
    ops = tuple(INSTALLABLE_OPS if ops is None else ops)
    for op in ops:
        if op == "gated_residual":
            raise ValueError("gated_residual cannot be installed: diffusers writes x + gate * y inline in the block "
                             "forwards; call sid_fast.kernels.gated_residual from model code instead")
        if op not in INSTALLABLE_OPS:
            raise ValueError(f"unknown block op {op!r}; installable: {INSTALLABLE_OPS}")
    return ops


def check_block_backend(backend: str) -> None:
    """Raise a ValueError naming `kernels.block_backend` when `backend` cannot run every installable op."""
    missing = [op for op in REGISTRY_OPS if backend not in backends(op)]
    if missing:
        raise ValueError(f"config field kernels.block_backend: no backend {backend!r} for {', '.join(missing)}; "
                         f"registered: {backends(missing[0])}")


def apply_block_kernels(networks: list, backend: str) -> list[BlockKernelReport]:
    """The `kernels.block_backend` hook of the trainer: install on every diffusers model inside `networks`.
    `torch` installs nothing (the networks run diffusers' own code, as without the hook)."""
    check_block_backend(backend)
    if backend == "torch":
        return []
    from sid_fast.kernels.attention import diffusers_models

    return [install_block_kernels(model, backend) for model in diffusers_models(networks)]


def _swap(obj, fused: type, backend: str) -> None:
    if not hasattr(obj, _ORIGINAL):
        setattr(obj, _ORIGINAL, type(obj))
    obj.__class__ = fused
    obj.kernel_backend = backend


def install_block_kernels(model: nn.Module, backend: str = "triton", ops=None) -> BlockKernelReport:
    """Switch the modules of `model` that the block ops cover; returns a report of what was swapped.

    backend: `torch` (the references: numerically identical to the unswapped model), `triton` (falls back to the
      reference with one log line where not eligible, e.g. on a CPU without TRITON_INTERPRET=1), or another
      backend registered for every block op. ops: a subset of INSTALLABLE_OPS (default all).
    Installing again re-targets the backend; modules already swapped count again.
    """
    ops = _check(backend, ops)
    from sid_fast.kernels.diffusers_blocks import FUSED_CLASSES

    by_fused = {fused: original for original, fused in FUSED_CLASSES.items()}
    report = BlockKernelReport(backend)
    for path, module in model.named_modules():
        candidates = [(path, module)]
        processor = getattr(module, "processor", None)
        if processor is not None and not isinstance(processor, nn.Module):
            candidates.append((f"{path}.processor", processor))
        for name, obj in candidates:
            original = by_fused.get(type(obj), type(obj))
            fused = FUSED_CLASSES.get(original)
            if fused is None or fused.op not in ops:
                continue
            reason = fused.unsupported(obj)
            if reason is not None:
                report.skipped[name] = f"{original.__name__}: {reason}"
                continue
            _swap(obj, fused, backend)
            report.swapped[f"{original.__name__} -> {fused.op}"] += 1
    (log.info if report.total else log.warning)("%s", report)
    return report


def uninstall_block_kernels(model: nn.Module) -> int:
    """Give every swapped module and processor of `model` its diffusers class back; returns how many."""
    restored = 0
    for module in model.modules():
        for obj in (module, getattr(module, "processor", None)):
            if obj is not None and hasattr(obj, _ORIGINAL):
                obj.__class__ = getattr(obj, _ORIGINAL)
                delattr(obj, _ORIGINAL)
                obj.__dict__.pop("kernel_backend", None)
                restored += 1
    return restored
