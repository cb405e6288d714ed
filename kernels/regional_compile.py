"""Regional `torch.compile` of the three networks (`kernels.compile`): each repeated DiT block compiled, the rest
eager.

A DiT spends nearly all its time in N copies of one or two block classes (SD3's `JointTransformerBlock`, FLUX's
double and single blocks, SANA's `SanaTransformerBlock`). Compiling the block's `forward` once serves every
instance, in all three networks: with inlined nn.Module parameters (torch's default) a block's weights are graph
inputs, so the teacher, the fake score and the generator share one compiled graph per block variant instead of
each compiling a whole model (minutes at FLUX size). Blocks are found through diffusers' `_repeated_blocks` where a
model declares it (FLUX in diffusers 0.42.1), else as the members of every `nn.ModuleList` whose entries share one
class (SD3's and SANA's `transformer_blocks`, any DiT of the same build). A model with no such list stays eager.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

log = logging.getLogger("sid_fast.kernels")

RECOMPILE_LIMIT = 64
"""Dynamo's per-code-object limit while regional compile is on: block variants (SD3's last block, SD3.5's dual
attention layers) x weight dtypes (a bf16 teacher, fp32 students) x grad modes each take a slot; the default (8)
would silently drop the later ones back to eager."""


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of `model` (diffusers `_repeated_blocks`, else same-class ModuleList members)."""
    declared = set()
    for module in model.modules():
        declared.update(getattr(module, "_repeated_blocks", None) or ())
    if declared:
        return [m for m in model.modules() if type(m).__name__ in declared]
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            classes = {type(child) for child in module}
            if len(classes) == 1 and not isinstance(module[0], (nn.Linear, nn.ModuleList)):
                blocks.extend(module)
    seen: set[int] = set()
    out = []
    for block in blocks:  # a block nested in another found block is compiled with it
        if id(block) not in seen and not any(block is not b and any(block is s for s in b.modules()) for b in blocks):
            seen.add(id(block))
            out.append(block)
    return out


def compile_regions(networks: dict[str, nn.Module], mode: str = "default", backend: str = "inductor",
                    fullgraph: bool = False) -> dict[str, int]:
    """Compile the repeated blocks of every network in place (`module.compile`); returns blocks compiled per network.

    Each distinct module object is compiled once even when networks share it (a LoRA fake score over the teacher).
    """
    import torch._dynamo

    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), RECOMPILE_LIMIT))
    options = {} if mode == "default" else {"mode": mode}
    done: set[int] = set()
    counts: dict[str, int] = {}
    for name, network in networks.items():
        blocks = [b for b in repeated_blocks(network) if id(b) not in done]
        for block in blocks:
            block.compile(backend=backend, fullgraph=fullgraph, **options)
            done.add(id(block))
        counts[name] = len(blocks)
        kinds = Counter(type(b).__name__ for b in blocks)
        log.info("kernels.compile: %s: %s", name, ", ".join(f"{n} x{c}" for n, c in kinds.items()) or "no repeated blocks (eager)")
    return counts
