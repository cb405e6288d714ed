"""Attention backend of the diffusers networks, through diffusers' own mechanism
(`ModelMixin.set_attention_backend`, `diffusers.models.attention_dispatch`).

`auto` picks, on CUDA, flash-attn 3, then flash-attn 2, then xformers, whichever is installed and usable, and
PyTorch SDPA (`native`) otherwise; on the CPU always SDPA (fused CPU flash kernel with backward, so the
input-gradient backward of the frozen teacher and fake score (§3) works). An explicit choice that cannot run
here falls back to SDPA. Either way one log line says which backend runs.
"""

from __future__ import annotations

import importlib.util
import logging

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


def choose_attention_backend(preferred: str, device: torch.device | str) -> tuple[str, str]:
    """(backend, why) for `preferred` in auto/native/flash/flash_3/xformers on `device`."""
    if preferred != "auto" and preferred not in DIFFUSERS_NAMES:
        raise ValueError(f"unknown attention backend {preferred!r}; expected auto or one of {sorted(DIFFUSERS_NAMES)}")
    on_cuda = torch.device(device).type == "cuda"
    if preferred == "auto":
        for backend in AUTO_ORDER if on_cuda else ():
            if _installed(backend):
                return backend, "auto: best installed on CUDA"
        return "native", "auto: " + ("no flash-attn/xformers installed" if on_cuda else "SDPA on CPU")
    if preferred == "native":
        return "native", "requested"
    if not on_cuda:
        return "native", f"{preferred} has no CPU kernels; falling back to SDPA"
    if not _installed(preferred):
        return "native", f"{preferred} is not installed or too old; falling back to SDPA"
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
    """Set the attention backend of every diffusers model in `networks`; returns the backend (None: no model)."""
    models = diffusers_models(networks)
    if not models:
        return None
    device = next((p.device for m in models for p in m.parameters()), torch.device("cpu"))
    backend, why = choose_attention_backend(preferred, device)
    if backend != "native" or preferred != "auto":  # auto + native is diffusers' default: nothing to change
        for model in models:
            model.set_attention_backend(DIFFUSERS_NAMES[backend])
    hooked = sum(hooked_processors(m) for m in models)
    direct = sum(1 for m in models for a in m.modules() if getattr(a, "processor", None) is not None) - hooked
    message = "attention backend: %s (%s) for %d diffusers network(s) on %s"
    (log.warning if "falling back" in why else log.info)(message, backend, why, len(models), device)
    if direct:  # SD3's and SANA's processors in diffusers 0.42 call SDPA themselves
        log.info("attention: %d processor(s) have no diffusers backend hook and run PyTorch SDPA", direct)
    return backend


def hooked_processors(model: nn.Module) -> int:
    """Attention processors of `model` that follow diffusers' backend dispatch (FLUX's do; SD3's, SANA's do not)."""
    return sum(1 for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend"))
