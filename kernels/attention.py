"""Attention backend of the diffusers networks, through diffusers' own mechanism
(`ModelMixin.set_attention_backend`, `diffusers.models.attention_dispatch`).

`auto` picks, on CUDA, flash-attn 3, then flash-attn 2, then xformers, whichever is installed and usable for
training, and PyTorch SDPA (`native`) otherwise; on the CPU always SDPA (fused CPU flash kernel with backward, so
the input-gradient backward of the frozen teacher and fake score (§3) works). An explicit choice that cannot run
here falls back to SDPA. Either way one log line says which backend runs.

diffusers 0.42.1 routes only FLUX's processors through its dispatcher; SD3/SD3.5's `JointAttnProcessor2_0` and
SANA's softmax cross-attention `SanaAttnProcessor2_0` call SDPA themselves. Before setting the backend,
`apply_attention_backend` gives those modules dispatching twins (kernels/diffusers_attention.py; bit-equal with
SDPA), so the choice reaches every softmax attention of the three families. SANA's linear self-attention has no
softmax attention to dispatch.

flash-attn 3 counts as usable only when diffusers' flash-attn 3 op has a backward: in diffusers 0.42.1 its
`_flash_3` backend wraps the kernel in a `torch.library.custom_op` with no autograd formula, so the first backward
through attention (every SiD step differentiates the teacher, fake score and generator) would raise.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter

import torch
from torch import nn

log = logging.getLogger("sid_fast.kernels")

# our name -> diffusers AttentionBackendName value
DIFFUSERS_NAMES = {"native": "native", "flash": "flash", "flash_3": "_flash_3", "xformers": "xformers"}
AUTO_ORDER = ("flash_3", "flash", "xformers")


def _installed(backend: str) -> bool:
    if backend == "native":
        return True
    module = {"flash": "flash_attn", "flash_3": "flash_attn_interface", "xformers": "xformers"}[backend]
    if importlib.util.find_spec(module) is None:
        return False
    from diffusers.models import attention_dispatch  # its own version checks of the installed library

    flag = {"flash": "_CAN_USE_FLASH_ATTN", "flash_3": "_CAN_USE_FLASH_ATTN_3", "xformers": "_CAN_USE_XFORMERS_ATTN"}
    return bool(getattr(attention_dispatch, flag[backend], False))


def _flash_3_has_backward() -> bool:
    """Whether diffusers' flash-attn 3 call can be differentiated: its `torch.library.custom_op` wrapper needs a
    registered autograd formula (diffusers 0.42.1 registers none); a plain function (old torch) keeps flash-attn 3's
    own autograd.Function."""
    from diffusers.models import attention_dispatch

    op = getattr(attention_dispatch, "_wrapped_flash_attn_3", None)
    if op is None:
        return False
    return not hasattr(op, "_backward_fn") or op._backward_fn is not None


def _unusable(backend: str) -> str | None:
    """None when `backend` can run (forward and backward) on this CUDA machine, else why not."""
    if backend == "native":
        return None
    if not _installed(backend):
        return f"{backend} is not installed or too old"
    if backend == "flash_3" and not _flash_3_has_backward():
        return "flash_3 has no backward in diffusers' op (training differentiates attention)"
    return None


def choose_attention_backend(preferred: str, device: torch.device | str) -> tuple[str, str]:
    """(backend, why) for `preferred` in auto/native/flash/flash_3/xformers on `device`."""
    if preferred != "auto" and preferred not in DIFFUSERS_NAMES:
        raise ValueError(f"unknown attention backend {preferred!r}; expected auto or one of {sorted(DIFFUSERS_NAMES)}")
    on_cuda = torch.device(device).type == "cuda"
    if preferred == "auto":
        skipped = []
        for backend in AUTO_ORDER if on_cuda else ():
            reason = _unusable(backend)
            if reason is None:
                return backend, "auto: best usable on CUDA" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
            if _installed(backend):
                skipped.append(reason)
        if not on_cuda:
            return "native", "auto: SDPA on CPU"
        return "native", "auto: " + ("; ".join(skipped) if skipped else "no flash-attn/xformers installed")
    if preferred == "native":
        return "native", "requested"
    if not on_cuda:
        return "native", f"{preferred} has no CPU kernels; falling back to SDPA"
    reason = _unusable(preferred)
    if reason is not None:
        return "native", f"{reason}; falling back to SDPA"
    return preferred, "requested"


def diffusers_models(networks: list) -> list[nn.Module]:
    """The diffusers models (anything with `set_attention_backend`) inside `networks`, outermost first."""
    found: list[nn.Module] = []
    for network in networks:
        for module in network.modules() if isinstance(network, nn.Module) else ():
            if hasattr(module, "set_attention_backend") and not any(module is f for f in found):
                if not any(any(module is sub for sub in f.modules()) for f in found):
                    found.append(module)
    return found


def apply_attention_backend(networks: list, preferred: str = "auto") -> str | None:
    """Set the attention backend of every diffusers model in `networks`; returns the backend (None: no model).

    First gives SD3/SD3.5's and SANA's SDPA-calling processors their dispatching twins (bit-equal with SDPA,
    kernels/diffusers_attention.py), so the backend reaches them as it reaches FLUX's."""
    models = diffusers_models(networks)
    if not models:
        return None
    from sid_fast.kernels.diffusers_attention import (
        NO_MASK_BACKENDS,
        DispatchSanaAttnProcessor,
        install_dispatch_processors,
        linear_attention_processors,
    )

    switched = sum((install_dispatch_processors(model) for model in models), Counter())
    device = next((p.device for m in models for p in m.parameters()), torch.device("cpu"))
    backend, why = choose_attention_backend(preferred, device)
    if backend != "native" or preferred != "auto":  # auto + native is diffusers' default: nothing to change
        for model in models:
            model.set_attention_backend(DIFFUSERS_NAMES[backend])
    hooked = sum(hooked_processors(m) for m in models)
    linear = sum(linear_attention_processors(m) for m in models)
    direct = sum(1 for m in models for a in m.modules() if getattr(a, "processor", None) is not None) - hooked - linear
    message = "attention backend: %s (%s) for %d diffusers network(s) on %s; %d processor(s) dispatched"
    (log.warning if "falling back" in why else log.info)(message, backend, why, len(models), device, hooked)
    if switched:
        log.info("attention: dispatching twins (kernels/diffusers_attention.py) installed for %s",
                 ", ".join(f"{n} {name} module(s)" for name, n in sorted(switched.items())))
    if linear:
        log.info("attention: %d linear-attention processor(s) (SANA self-attention) have no softmax attention "
                 "for a backend", linear)
    masked = any(isinstance(getattr(a, "processor", None), DispatchSanaAttnProcessor)
                 for m in models for a in m.modules())
    if masked and DIFFUSERS_NAMES[backend] in {name.value for name in NO_MASK_BACKENDS}:
        log.warning("attention: %s takes no attention mask: SANA's cross-attention calls with a text mask run "
                    "PyTorch SDPA", backend)
    if direct:
        log.info("attention: %d processor(s) have no diffusers backend hook and run their own attention", direct)
    return backend


def hooked_processors(model: nn.Module) -> int:
    """Attention modules of `model` whose processor follows diffusers' backend dispatch (FLUX's, and SD3's and
    SANA's softmax ones once `apply_attention_backend` has installed the dispatching twins)."""
    return sum(1 for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend"))
