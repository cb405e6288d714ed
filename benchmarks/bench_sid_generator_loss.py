"""The fused SiD generator loss (forward + backward, §3) per provider: eager PyTorch (`torch`), `compile`
(the registry's backend: torch.compile of the reference), `cpp` (csrc/, OpenMP) and `triton` (CUDA only; the
interpreter is not timed).

    ./run bench -k sid_generator_loss                          (pytest-benchmark, one row per provider)
    python benchmarks/bench_sid_generator_loss.py [CSV]        (all providers in one run, fp32: ratios + CSV rows)
    python benchmarks/bench_sid_generator_loss.py --auto [CSV] (both loss ops, fp32 and bf16, all providers in one
        run, default CSV benchmarks/results/kernels_cpu_auto.csv; prints the ranking kernels.loss_backend=auto uses)
"""

import sys

import pytest
import torch

from sid_fast.kernels import timing

OP = "cfg_sid_generator_loss"
SHAPES = [(8, 16, 32, 32), (4, 16, 64, 64)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["torch", "compile", "cpp"] + (["triton"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sid_generator_loss_fwd_bwd(benchmark, shape, provider):
    args = timing.make_inputs(OP, shape, torch.float32, device=DEVICE)
    step = timing.make_step(OP, provider, args, "fwd+bwd")
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = timing.latent_bytes(OP, args, "fwd+bwd") / benchmark.stats.stats.median / 1e9


def main(csv_path: str = "benchmarks/results/kernels_cpu.csv", ops=(OP,), dtypes=(torch.float32,)) -> list:
    rows = []
    for op in ops:
        for dtype in dtypes:
            for shape in SHAPES:
                rows += timing.time_op(op, PROVIDERS, shape, dtype, DEVICE, repeat=30)
    print(f"device: {timing.device_name(DEVICE)}, torch {torch.__version__}")
    print(timing.table(rows))
    timing.append_csv(rows, csv_path)
    return rows


def auto(csv_path: str = "benchmarks/results/kernels_cpu_auto.csv") -> None:
    """Both loss ops side by side, fp32 and bf16: the numbers behind kernels.loss_backend=auto on this device."""
    rows = main(csv_path, ("cfg_sid_generator_loss", "cfg_fake_score_loss"), (torch.float32, torch.bfloat16))
    print("\nkernels.loss_backend=auto: providers ranked by the summed fwd+bwd median of both loss ops")
    for (device_type, dtype, shape), ranked in sorted(timing.loss_winners(rows, "median_ms").items()):
        print(f"  {device_type} {dtype:<9} {shape:<14} {' < '.join(ranked)}")


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    if sys.argv[1:2] == ["--auto"]:
        auto(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
