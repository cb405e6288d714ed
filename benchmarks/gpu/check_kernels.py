"""GPU check and timing of every fused kernel, in one short run (called by benchmarks/gpu/run.sh).

1. conformance on CUDA: each op x backend (triton, cpp when its CUDA build works) x fp32/bf16/fp16, values and every
   gradient against the reference (STYLE.md tolerance rule, kernels/conformance.py), at the ops' standard shapes and
   production sizes (latents (8, 16, 128, 128); FLUX width 3072, 24 heads of 128, 4608 tokens for the block ops);
2. measured copy bandwidth (device-to-device `copy_`), then each provider's forward and forward+backward at
   (8, 16, 128, 128) in bf16 and fp32 and FLUX-packed (8, 4096, 64) in bf16: GB/s and the fraction of the copy bandwidth;
3. the DiT block ops (adaLN modulation, gated residual, RMSNorm with/without weight, rotary q+k) in bf16 at FLUX
   sizes: eager vs torch.compile vs triton, and a verdict per op: keep the kernel only where it beats both;
4. a DiT block (adaLN-modulated attention with qk RMSNorm + MLP, 1024 tokens, width 1152) forward+backward: eager
   under each SDPA backend (flash, efficient, cudnn, math) and flash-attn/xformers when installed, torch.compile with
   SDPA, and with the block ops on triton (eager and compiled); when diffusers is importable (a wheel in
   benchmarks/gpu/wheels/), FLUX double/single and SD3.5 blocks with and without `install_block_kernels`;
5. CSVs (appended) and a short table, printed last.
Sections 3-4 stop early, with a line saying so, when the run nears its time budget (--budget seconds).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # block_kernels.py next to this file


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
    """adaLN-zero DiT block as diffusers' SD3.5/FLUX blocks compute it: modulated LayerNorm -> attention with qk
    RMSNorm -> gated residual, modulated LayerNorm -> MLP -> gated residual. The norms, modulations and residuals
    run through the block ops with `backend`: `torch` is their reference (diffusers' PyTorch arithmetic), `triton`
    the fused kernels."""

    def __init__(self, width: int, heads: int, kernels, backend: str = "torch"):
        super().__init__()
        self.heads, self.kernels, self.backend = heads, kernels, backend
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(width, width) for _ in range(3))
        self.q_norm_weight = torch.nn.Parameter(torch.ones(width // heads))
        self.k_norm_weight = torch.nn.Parameter(torch.ones(width // heads))
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(4 * width, width))
        self.modulation = torch.nn.Linear(width, 6 * width)

    def forward(self, tokens, cond, attention):  # tokens (B, N, D), cond (B, D)
        ops, backend = self.kernels, self.backend
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)  # (B, D) each
        h = ops.adaln_modulation(tokens, scale1, shift1, 1e-6, backend=backend)
        q = ops.rms_norm(self.to_q(h).unflatten(-1, (self.heads, -1)), self.q_norm_weight, 1e-6, backend=backend)
        k = ops.rms_norm(self.to_k(h).unflatten(-1, (self.heads, -1)), self.k_norm_weight, 1e-6, backend=backend)
        v = self.to_v(h).unflatten(-1, (self.heads, -1))  # (B, N, H, d)
        attended = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).flatten(2)
        tokens = ops.gated_residual(tokens, gate1, self.proj(attended), backend=backend)
        h = ops.adaln_modulation(tokens, scale2, shift2, 1e-6, backend=backend)
        return ops.gated_residual(tokens, gate2, self.mlp(h), backend=backend)


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


def time_dit_block(device: str, timing, kernels, deadline, width: int = 1152, tokens_per_sample: int = 1024,
                   dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """DiT block forward+backward: eager under every attention function, torch.compile with default SDPA, and the
    block ops on triton (eager and compiled, default SDPA)."""
    rows = []
    block = DiTBlock(width, 16, kernels).to(device, dtype)
    tokens = torch.randn(4, tokens_per_sample, width, device=device, dtype=dtype, requires_grad=True)
    cond = torch.randn(4, width, device=device, dtype=dtype)
    from torch.nn.functional import scaled_dot_product_attention

    variants = [(f"eager+{name}", "torch", False, fn) for name, fn in attention_functions().items()]
    variants += [("compile+sdpa_default", "torch", True, scaled_dot_product_attention),
                 ("eager+sdpa_default+block_ops_triton", "triton", False, scaled_dot_product_attention),
                 ("compile+sdpa_default+block_ops_triton", "triton", True, scaled_dot_product_attention)]
    for provider, backend, compiled, attention in variants:
        if deadline():
            rows.append({"what": "dit_block_fwd_bwd", "provider": provider, "error": "skipped: time budget"})
            continue
        block.backend = backend
        torch._dynamo.reset()
        module = torch.compile(block) if compiled else block

        def step(module=module, attention=attention):
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
    parser.add_argument("--budget", type=float, default=440.0, help="seconds; later timing sections stop near it")
    args = parser.parse_args()
    started = time.perf_counter()

    def deadline() -> bool:
        return time.perf_counter() - started > args.budget

    device = "cuda"
    card = torch.cuda.get_device_name(0)
    kernels = import_kernels()
    import block_kernels

    from sid_fast.kernels import conformance, cpp, timing
    from sid_fast.kernels.ops import LOSS_OPS

    lines, failures = [f"card: {card}, torch {torch.__version__}"], 0
    try:
        cpp.load()
        lines.append(f"cpp extension: built, devices {cpp.devices()}")
    except Exception as error:  # optional backend (needs nvcc for CUDA): say so and go on
        lines.append(f"cpp extension: not available ({str(error).splitlines()[-1][:150]})")
    backends = ["triton"] + (["cpp"] if "cuda" in cpp.devices() else [])
    for op in kernels.ops():
        big = [(8, 16, 128, 128), (2, 4096, 64)] if op in LOSS_OPS else block_kernels.CONFORMANCE_SHAPES.get(op, [])
        for backend in [b for b in backends if b in kernels.backends(op)]:
            results = conformance.check_backend(op, backend, shapes=[*conformance.op_shapes(op), *big],
                                                dtypes=(torch.float32, torch.bfloat16, torch.float16), device=device)
            failures += not conformance.passed(results)
            lines.append(f"conformance {op} {backend}: " + conformance.report(results).splitlines()[-1])
            if not conformance.passed(results):
                print(conformance.report(results, failures_only=True))
    bandwidth = copy_bandwidth(device)
    lines.append(f"copy bandwidth: {bandwidth:.0f} GB/s")
    rows = []
    for op in LOSS_OPS:  # torch.compile recompiles per shape and dtype: three cases keep the run short
        for shape, dtype in (((8, 16, 128, 128), torch.bfloat16), ((8, 16, 128, 128), torch.float32),
                             ((8, 4096, 64), torch.bfloat16)):
            rows += timing.time_op(op, ["torch", "compile", *[b for b in backends if b in kernels.backends(op)]],
                                   shape, dtype, device, repeat=20)
    block_rows = []
    for op, shape in block_kernels.TIMING_SHAPES.items():
        if deadline():
            lines.append(f"block op timing stopped at {op}: time budget")
            break
        block_rows += timing.time_op(op, ["torch", "compile", "triton"], shape, torch.bfloat16, device, repeat=20)
    out = Path(args.out)
    timing.append_csv(rows + block_rows, out / "kernels_gpu.csv")
    dit_rows = time_dit_block(device, timing, kernels, deadline)
    dit_rows += block_kernels.time_diffusers_blocks(device, timing, kernels, deadline)
    with open(out / "dit_block_gpu.csv", "a") as handle:
        for row in dit_rows:
            handle.write(f"{card},{row['what']},{row['provider']},{row.get('median_ms', '')},{row.get('error', '')}\n")
    print(timing.table(rows + block_rows))
    print(f"\n{'fraction of copy bandwidth':<40}")
    for r in rows + block_rows:
        print(f"{r.op:<24} {r.mode:<8} {r.shape:<12} {r.dtype:<9} {r.provider:<8} {r.gb_per_s:8.0f} GB/s "
              f"{100 * r.gb_per_s / bandwidth:5.1f}%")
    print("\nblock ops: keep a kernel only where it wins")
    print("\n".join(block_kernels.verdicts(block_rows)))
    for row in dit_rows:
        print(f"{row['what']:<24} {row['provider']:<40} " + (f"{row['median_ms']:.2f} ms" if "median_ms" in row
                                                              else f"error {row['error']}"))
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
