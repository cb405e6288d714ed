"""GPU check and timing of every fused kernel, in one short run (called by benchmarks/gpu/run.sh).

1. conformance on CUDA: each op x backend (triton, cpp when its CUDA build works) x fp32/bf16/fp16, values and every
   gradient against the reference (STYLE.md tolerance rule, kernels/conformance.py);
2. measured copy bandwidth (device-to-device `copy_`), then each provider's forward and forward+backward at
   (8, 16, 128, 128) in bf16 and fp32 and FLUX-packed (8, 4096, 64) in bf16: GB/s and the fraction of the copy bandwidth;
3. a DiT block (adaLN-modulated attention + MLP, 1024 tokens, width 1152) forward+backward: eager under each SDPA
   backend (flash, efficient, cudnn, math) and flash-attn/xformers when installed, and torch.compile with SDPA;
4. a CSV (appended) and a short table, printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def import_kernels():
    """`sid_fast.kernels` from the installed package, or straight from the checkout's kernels/ folder."""
    sys.path.insert(0, str(ROOT))
    try:
        import sid_fast.kernels as kernels
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location("sid_fast.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["sid_fast.kernels"] = kernels
        spec.loader.exec_module(kernels)
    return kernels


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write counted), median of 20."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / sorted(times)[len(times) // 2] / 1e9


class DiTBlock(torch.nn.Module):
    """adaLN-zero DiT block: modulated LayerNorm -> attention -> gated residual, modulated LayerNorm -> MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(4 * width, width))
        self.modulation = torch.nn.Linear(width, 6 * width)

    def forward(self, tokens, cond, attention):  # tokens (B, N, D), cond (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        h = self.norm(tokens) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        tokens = tokens + gate1 * self.proj(attention(q, k, v).transpose(1, 2).flatten(2))
        h = self.norm(tokens) * (1 + scale2) + shift2
        return tokens + gate2 * self.mlp(h)


def attention_functions() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def with_backend(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return sdpa(q, k, v)
        return run

    functions = {f"sdpa_{b.name.lower()}": with_backend(b) for b in
                 (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH)}
    if importlib.util.find_spec("flash_attn"):
        from flash_attn import flash_attn_func

        functions["flash_attn"] = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                 v.transpose(1, 2)).transpose(1, 2)
    if importlib.util.find_spec("xformers"):
        from xformers.ops import memory_efficient_attention

        functions["xformers"] = lambda q, k, v: memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                           v.transpose(1, 2)).transpose(1, 2)
    return functions


def time_dit_block(device: str, timing, width: int = 1152, tokens_per_sample: int = 1024,
                   dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """DiT block forward+backward: eager under every attention function, torch.compile with default SDPA."""
    rows = []
    block = DiTBlock(width, 16).to(device, dtype)
    tokens = torch.randn(4, tokens_per_sample, width, device=device, dtype=dtype, requires_grad=True)
    cond = torch.randn(4, width, device=device, dtype=dtype)
    from torch.nn.functional import scaled_dot_product_attention

    variants = [(f"eager+{name}", block, fn) for name, fn in attention_functions().items()]
    variants.append(("compile+sdpa_default", torch.compile(block), scaled_dot_product_attention))
    for provider, module, attention in variants:
        def step():
            module(tokens, cond, attention).float().square().mean().backward()
        try:
            times = timing.measure(step, device, repeat=10, warmup=3)
            median = sorted(times)[len(times) // 2]
            rows.append({"what": "dit_block_fwd_bwd", "provider": provider, "median_ms": median})
        except Exception as error:  # a backend this card or build lacks: report it, keep measuring the rest
            rows.append({"what": "dit_block_fwd_bwd", "provider": provider, "error": repr(error)[:120]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    device = "cuda"
    card = torch.cuda.get_device_name(0)
    kernels = import_kernels()
    from sid_fast.kernels import conformance, cpp, timing

    lines, failures = [f"card: {card}, torch {torch.__version__}"], 0
    try:
        cpp.load()
        lines.append(f"cpp extension: built, devices {cpp.devices()}")
    except Exception as error:  # optional backend (needs nvcc for CUDA): say so and go on
        lines.append(f"cpp extension: not available ({str(error).splitlines()[-1][:150]})")
    backends = ["triton"] + (["cpp"] if "cuda" in cpp.devices() else [])
    shapes = list(conformance.STANDARD_SHAPES) + [(8, 16, 128, 128), (2, 4096, 64)]
    for op in kernels.ops():
        for backend in backends:
            results = conformance.check_backend(op, backend, shapes=shapes,
                                                dtypes=(torch.float32, torch.bfloat16, torch.float16), device=device)
            failures += not conformance.passed(results)
            lines.append(f"conformance {op} {backend}: " + conformance.report(results).splitlines()[-1])
            if not conformance.passed(results):
                print(conformance.report(results, failures_only=True))
    bandwidth = copy_bandwidth(device)
    lines.append(f"copy bandwidth: {bandwidth:.0f} GB/s")
    rows = []
    for op in kernels.ops():  # torch.compile recompiles per shape and dtype: three cases keep the run short
        for shape, dtype in (((8, 16, 128, 128), torch.bfloat16), ((8, 16, 128, 128), torch.float32),
                             ((8, 4096, 64), torch.bfloat16)):
            rows += timing.time_op(op, ["torch", "compile", *backends], shape, dtype, device, repeat=20)
    out = Path(args.out)
    timing.append_csv(rows, out / "kernels_gpu.csv")
    dit_rows = time_dit_block(device, timing)
    with open(out / "dit_block_gpu.csv", "a") as handle:
        for row in dit_rows:
            handle.write(f"{card},{row['what']},{row['provider']},{row.get('median_ms', '')},{row.get('error', '')}\n")
    print(timing.table(rows))
    print(f"\n{'fraction of copy bandwidth':<40}")
    for r in rows:
        print(f"{r.op:<24} {r.mode:<8} {r.shape:<12} {r.dtype:<9} {r.provider:<8} {r.gb_per_s:8.0f} GB/s "
              f"{100 * r.gb_per_s / bandwidth:5.1f}%")
    for row in dit_rows:
        print(f"DiT block fwd+bwd {row['provider']:<28} " + (f"{row['median_ms']:.2f} ms" if "median_ms" in row
                                                              else f"error {row['error']}"))
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
