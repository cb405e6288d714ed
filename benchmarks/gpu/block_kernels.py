"""The DiT block-op part of the prepared GPU run (benchmarks/gpu/check_kernels.py): production sizes, the
keep-or-drop verdict per op, and diffusers' FLUX / SD3.5 blocks timed with and without `install_block_kernels`
(only when diffusers is importable: the GPU image has none unless a wheel travels in benchmarks/gpu/wheels/)."""

from __future__ import annotations

import importlib.util

import torch

# conformance at production sizes: FLUX width 3072, 24 heads of 128 over 4096 image + 512 text tokens; SANA's
# qk-norm across 70 heads of 32 (2240: not a power of two)
CONFORMANCE_SHAPES = {"adaln_modulation": [(2, 1024, 3072)], "gated_residual": [(2, 1024, 3072)],
                      "rms_norm": [(2, 4608, 24, 128)], "weighted_rms_norm": [(2, 4608, 24, 128), (2, 1024, 2240)],
                      "rotary_qk": [(1, 4608, 24, 128)]}
TIMING_SHAPES = {"adaln_modulation": (2, 4608, 3072), "gated_residual": (2, 4608, 3072),
                 "rms_norm": (2, 4608, 24, 128), "weighted_rms_norm": (2, 4608, 24, 128),
                 "rotary_qk": (2, 4608, 24, 128)}
WIN_MARGIN = 0.05
"""A kernel is kept when it is at least this much faster than the better of eager and torch.compile."""


def verdicts(rows) -> list[str]:
    """One line per (op, mode): eager, compile and triton medians and whether the Triton kernel wins."""
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r.op, r.mode, r.shape, r.dtype), {})[r.provider] = r.median_ms
    lines = [f"{'op':<20} {'mode':<8} {'shape':<16} {'dtype':<9} {'eager ms':>9} {'compile':>9} {'triton':>9}  verdict"]
    for (op, mode, shape, dtype), ms in by_key.items():
        eager, compiled, fused = ms.get("torch"), ms.get("compile"), ms.get("triton")
        best_other = min(v for v in (eager, compiled) if v is not None) if (eager or compiled) else None
        if fused is None or best_other is None:
            verdict = "not measured"
        elif fused <= (1 - WIN_MARGIN) * best_other:
            verdict = f"keep triton ({best_other / fused:.2f}x the better of eager/compile)"
        else:
            verdict = f"drop: {'compile' if compiled == best_other else 'eager'} is as fast ({fused / best_other:.2f}x)"

        def show(value):
            return f"{value:9.3f}" if value is not None else f"{'-':>9}"

        lines.append(f"{op:<20} {mode:<8} {shape:<16} {dtype:<9} {show(eager)} {show(compiled)} {show(fused)}  "
                     f"{verdict}")
    return lines


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def diffusers_block_cases(device: str, dtype: torch.dtype) -> list[tuple[str, torch.nn.Module, tuple]]:
    """(name, block, inputs) for a FLUX double block, a FLUX single block (width 3072, 24 heads of 128, rotary over
    a 64x64 latent grid + 512 text tokens) and an SD3.5 dual-attention joint block (width 1536, qk RMSNorm)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    grid = torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.zeros(512, 3), torch.cat([torch.zeros(4096, 1), grid], 1)]).to(device)  # (4608, 3)
    rotary = FluxPosEmbed(10000, [16, 56, 56])(ids)
    flux_inputs = (randn(2, 4096, 3072), randn(2, 512, 3072), randn(2, 3072), rotary)
    cases = [("flux_double_block", FluxTransformerBlock(3072, 24, 128), flux_inputs),
             ("flux_single_block", FluxSingleTransformerBlock(3072, 24, 128), flux_inputs),
             ("sd35_joint_block", JointTransformerBlock(1536, 24, 64, context_pre_only=False, qk_norm="rms_norm",
                                                        use_dual_attention=True),
              (randn(2, 4096, 1536), randn(2, 333, 1536), randn(2, 1536)))]
    return [(name, block.to(device, dtype), inputs) for name, block, inputs in cases]


def time_diffusers_blocks(device: str, timing, kernels, deadline) -> list[dict]:
    """Forward+backward of each diffusers block: eager and compiled, without and with install_block_kernels."""
    rows = []
    if not diffusers_available():
        return [{"what": "diffusers_blocks", "provider": "-", "error": "diffusers not importable (no wheel): skipped"}]
    for name, block, inputs in diffusers_block_cases(device, torch.bfloat16):
        leaves = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
        for provider in ("eager", "eager+block_kernels", "compile", "compile+block_kernels"):
            if deadline():
                rows.append({"what": f"{name}_fwd_bwd", "provider": provider, "error": "skipped: time budget"})
                continue
            kernels.uninstall_block_kernels(block)
            if provider.endswith("block_kernels"):
                kernels.install_block_kernels(block, backend="triton")
            torch._dynamo.reset()
            module = torch.compile(block) if provider.startswith("compile") else block

            def step(module=module, leaves=leaves):
                outputs = module(*leaves)
                sum(o.float().square().mean() for o in outputs).backward()

            try:
                times = timing.measure(step, device, repeat=10, warmup=3)
                rows.append({"what": f"{name}_fwd_bwd", "provider": provider,
                             "median_ms": sorted(times)[len(times) // 2]})
            except Exception as error:  # report and go on: one failing variant must not hide the others
                rows.append({"what": f"{name}_fwd_bwd", "provider": provider, "error": repr(error)[:120]})
        kernels.uninstall_block_kernels(block)
        del block
        torch.cuda.empty_cache()
    return rows
