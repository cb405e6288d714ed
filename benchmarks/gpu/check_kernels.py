"""GPU check and timing of every fused kernel, in one short run (called by benchmarks/gpu/run.sh).

1. conformance on CUDA: each op x backend (triton, cpp when its CUDA build works) x fp32/bf16/fp16, values and every
   gradient against the reference (STYLE.md tolerance rule, kernels/conformance.py), at the ops' standard shapes and
   production sizes (latents (8, 16, 128, 128); FLUX width 3072, 24 heads of 128, 4608 tokens for the block ops);
2. the loss ops timed properly (kernels/timing.py `device_time_op`): copy bandwidth (1 GiB, and a copy of the
   same bytes timed like the op); per provider (torch eager, compile = torch.compile of the reference, triton, cpp)
   the DEVICE time of forward, backward (= fwd+bwd - fwd) and forward+backward from CUDA-graph replay with inputs
   rotated past the L2 cache, the host time per call (Python dispatch + launches of un-synchronised calls) and the
   pipelined eager wall time, the bytes each must move (forward: the six / four latents + t, λ read, B floats
   written; backward: the same read again with the output gradient, one gradient per input written) and the
   fraction of the copy bandwidth, at (8, 16, 128, 128) bf16 and fp32 and FLUX-packed (8, 4096, 64) bf16; then
   the winner per dtype for `kernels.loss_backend=auto` (a `LOSS_AUTO` snippet for kernels/ops.py), and a sweep of
   the Triton loss kernels' block size and warps;
3. the DiT block ops (adaLN modulation, gated residual, RMSNorm with/without weight, rotary q+k) in bf16 at FLUX
   sizes: eager vs torch.compile vs triton, and a verdict per op: keep the kernel only where it beats both;
4. a DiT block (adaLN-modulated attention with qk RMSNorm + MLP, 1024 tokens, width 1152) forward+backward: eager
   under each SDPA backend (flash, efficient, cudnn, math) and flash-attn/xformers when installed, torch.compile with
   SDPA, and with the block ops on triton (eager and compiled); when diffusers is importable (a wheel in
   benchmarks/gpu/wheels/), FLUX double/single and SD3.5 blocks with and without `install_block_kernels`;
5. CSVs (appended: kernels_gpu.csv, kernels_gpu_device.csv, dit_block_gpu.csv) and a short table, printed last.
Sections after 2 stop early, with a line saying so, when the run nears its time budget (--budget seconds);
--sections picks some of conformance,losses,sweep,blocks,dit (default: all, in that order).
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


def card_name(device: str) -> str:
    return torch.cuda.get_device_name(device).replace("NVIDIA ", "")


SECTIONS = ("conformance", "losses", "sweep", "blocks", "dit")
LOSS_CASES = (((8, 16, 128, 128), torch.bfloat16), ((8, 16, 128, 128), torch.float32), ((8, 4096, 64), torch.bfloat16))
SWEEP = ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16))
"""(elements per program, warps) tried for the Triton loss kernels at (8, 16, 128, 128) bf16."""


def time_losses(device, kernels, timing, backends, bandwidth, lines) -> list:
    """Section 2: device / host / eager time per call of every loss provider, bytes and fraction of the copy
    bandwidth; the winners for kernels.loss_backend=auto."""
    from sid_fast.kernels.ops import LOSS_OPS

    rows, same_size = [], {}
    for op in LOSS_OPS:
        providers = ["torch", "compile", *[b for b in backends if b in kernels.backends(op)]]
        for shape, dtype in LOSS_CASES:
            try:
                case_rows = timing.device_time_op(op, providers, shape, dtype, device, copy_gbps=bandwidth)
            except Exception as error:  # keep the other cases
                lines.append(f"loss timing {op} {shape} {dtype} failed: {error!r}"[:300])
                traceback.print_exc()
                continue
            rows += case_rows
            for r in case_rows:  # a copy moving the same bytes, timed the same way: what this size allows
                key = (r.op, r.shape, r.dtype, r.mode)
                if key not in same_size:
                    same_size[key] = timing.copy_graph_gbps(r.bytes, device)
    print("\nloss ops: device time per call (CUDA graph, inputs rotated past L2), host time per call, eager wall time; "
          f"copy bandwidth {bandwidth:.0f} GB/s")
    print(timing.device_table(rows, same_size))
    for key, label in (("device_ms", "device time"), ("eager_ms", "eager wall time")):
        print(f"\nkernels.loss_backend=auto: providers ranked by the summed fwd+bwd {label} of both loss ops")
        for (device_type, dtype, shape), ranked in sorted(timing.loss_winners(rows, key).items()):
            print(f"  {device_type} {dtype:<9} {shape:<14} {' < '.join(ranked)}")
    main_shape = "x".join(map(str, LOSS_CASES[0][0]))
    snippet = {(d, s): r for (_, d, s), r in timing.loss_winners(rows, "device_ms").items() if s == main_shape}
    print("\nLOSS_AUTO entries for kernels/ops.py (device time at " + main_shape + "):")
    for (dtype, _), ranked in sorted(snippet.items()):
        print(f'    ("cuda", "{dtype}"): ({tuple(ranked)!r}, "{card_name(device)} device time, fwd+bwd of both ops at '
              f'{main_shape}, benchmarks/gpu/check_kernels.py at {timing.git_sha()}"),')
    return rows


def sweep_launch(device, timing, bandwidth, deadline, lines) -> list:
    """Section 2b: the Triton loss kernels' (block, warps) at (8, 16, 128, 128) bf16, device time per config."""
    from sid_fast.kernels import sid_generator_loss

    launch, default, rows = sid_generator_loss.LAUNCH, dict(sid_generator_loss.LAUNCH), []
    try:
        for block, warps in SWEEP:
            if deadline():
                lines.append(f"triton launch sweep stopped at block {block}, {warps} warps: time budget")
                break
            launch.update(block=block, num_warps=warps)
            for op in ("cfg_sid_generator_loss", "cfg_fake_score_loss"):
                for r in timing.device_time_op(op, ["triton"], LOSS_CASES[0][0], torch.bfloat16, device,
                                               copy_gbps=bandwidth):
                    r.provider = f"triton:{block}/{warps}"
                    rows.append(r)
    finally:
        launch.update(default)
    print(f"\ntriton loss kernels: block / warps sweep (default {default['block']}/{default['num_warps']})")
    print(timing.device_table(rows))
    best = {}
    for r in rows:
        if r.mode != "fwd+bwd" and r.device_ms == r.device_ms:
            best.setdefault((r.op, r.mode), []).append((r.device_ms, r.provider))
    for (op, mode), options in sorted(best.items()):
        ms, provider = min(options)
        lines.append(f"sweep best {op} {mode}: {provider} {1e3 * ms:.1f} us")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--budget", type=float, default=440.0, help="seconds; later timing sections stop near it")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args()
    started = time.perf_counter()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")

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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "conformance" in sections:
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
    lines.append(f"copy bandwidth: {bandwidth:.0f} GB/s (1 GiB device-to-device copy, read + write)")
    loss_rows = []
    if "losses" in sections:
        loss_rows = time_losses(device, kernels, timing, backends, bandwidth, lines)
        if loss_rows:
            timing.append_csv(loss_rows, out / "kernels_gpu_device.csv")
    if "sweep" in sections and "triton" in backends and not deadline():
        sweep_rows = sweep_launch(device, timing, bandwidth, deadline, lines)
        if sweep_rows:
            timing.append_csv(sweep_rows, out / "kernels_gpu_device.csv")
    if "conformance" in sections and not deadline():  # the compile backend on CUDA (inductor's Triton code)
        for op in LOSS_OPS:
            timing.reset_compile(["compile"])
            results = conformance.check_backend(op, "compile", shapes=[(8, 16, 128, 128)],
                                                dtypes=(torch.float32, torch.bfloat16), device=device)
            failures += not conformance.passed(results)
            lines.append(f"conformance {op} compile: " + conformance.report(results).splitlines()[-1])
            if not conformance.passed(results):
                print(conformance.report(results, failures_only=True))
    block_rows = []
    if "blocks" in sections:
        for op, shape in block_kernels.TIMING_SHAPES.items():
            if deadline():
                lines.append(f"block op timing stopped at {op}: time budget")
                break
            block_rows += timing.time_op(op, ["torch", "compile", "triton"], shape, torch.bfloat16, device, repeat=20)
        if block_rows:
            timing.append_csv(block_rows, out / "kernels_gpu.csv")
    dit_rows = []
    if "dit" in sections:
        dit_rows = time_dit_block(device, timing, kernels, deadline)
        dit_rows += block_kernels.time_diffusers_blocks(device, timing, kernels, deadline)
        with open(out / "dit_block_gpu.csv", "a") as handle:
            for row in dit_rows:
                handle.write(f"{card},{row['what']},{row['provider']},{row.get('median_ms', '')},{row.get('error', '')}\n")
    if block_rows:
        print(timing.table(block_rows))
        print(f"\n{'fraction of copy bandwidth':<40}")
        for r in block_rows:
            print(f"{r.op:<24} {r.mode:<8} {r.shape:<12} {r.dtype:<9} {r.provider:<8} {r.gb_per_s:8.0f} GB/s "
                  f"{100 * r.gb_per_s / bandwidth:5.1f}%")
        print("\nblock ops: keep a kernel only where it wins")
        print("\n".join(block_kernels.verdicts(block_rows)))
    for row in dit_rows:
        print(f"{row['what']:<24} {row['provider']:<40} " + (f"{row['median_ms']:.2f} ms" if "median_ms" in row
                                                              else f"error {row['error']}"))
    if loss_rows:
        print("\nloss ops, % of copy bandwidth by device time (target >= 60 %):")
        for r in loss_rows:
            if r.shape == "8x16x128x128" and r.dtype == "bfloat16" and r.mode in ("fwd", "bwd"):
                print(f"  {r.op:<24} {r.mode:<4} {r.provider:<8} {1e3 * r.device_ms:7.1f} us {100 * r.copy_fraction:5.1f}%")
    lines.append(f"elapsed {time.perf_counter() - started:.0f} s of a {args.budget:.0f} s budget")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
