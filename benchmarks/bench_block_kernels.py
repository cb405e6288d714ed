"""The DiT block ops (adaLN modulation, gated residual, RMSNorm with/without weight, FLUX rotary on q and k), forward
and forward + backward, per provider: eager PyTorch (`torch`, the reference) and `compile` (torch.compile of the
reference), plus `triton` on CUDA. On the CPU Triton runs only interpreted (~3000x slower than torch), which says
nothing about the kernel: it is not timed here; benchmarks/gpu/check_kernels.py times it on a GPU.

    ./run bench -k block_kernels                           (pytest-benchmark, one row per op and provider)
    python benchmarks/bench_block_kernels.py               (all providers in one run: ratios + CSV rows)
"""

import sys

import pytest
import torch

from sid_fast.kernels import timing

# DiT-S-like width 384 (6 heads of 64) at 256 tokens (a 32x32 latent in 2x2 patches)
SHAPES = {"adaln_modulation": (4, 256, 384), "gated_residual": (4, 256, 384), "rms_norm": (4, 256, 6, 64),
          "weighted_rms_norm": (4, 256, 6, 64), "rotary_qk": (4, 256, 6, 64)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["torch", "compile"] + (["triton"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(SHAPES))
def test_block_op_fwd_bwd(benchmark, op, provider):
    args = timing.make_inputs(op, SHAPES[op], torch.float32, device=DEVICE)
    step = timing.make_step(op, provider, args, "fwd+bwd")
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    with torch.no_grad():
        out = timing.get_op(op).reference(*args)
    benchmark.extra_info["GB/s"] = timing.latent_bytes(op, args, "fwd+bwd", out) / benchmark.stats.stats.median / 1e9


def main(csv_path: str = "benchmarks/results/kernels_cpu.csv") -> None:
    rows = []
    for op, shape in SHAPES.items():
        rows += timing.time_op(op, PROVIDERS, shape, torch.float32, DEVICE, repeat=30)
    print(f"device: {timing.device_name(DEVICE)}, torch {torch.__version__}")
    print(timing.table(rows))
    timing.append_csv(rows, csv_path)


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    main(*sys.argv[1:])
