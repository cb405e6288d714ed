"""The fused fake-score loss (forward + backward, §3) per provider: eager PyTorch (`torch`), `compile`
(the registry's backend: torch.compile of the reference), `cpp` (csrc/, OpenMP) and `triton` (CUDA only; the
interpreter is not timed).

    ./run bench -k fake_score_loss                      (pytest-benchmark, one row per provider)
    python benchmarks/bench_fake_score_loss.py          (all providers in one run: ratios + CSV rows)
    python benchmarks/bench_sid_generator_loss.py --auto   (both loss ops, fp32 and bf16, in one run)
"""

import sys

import pytest
import torch

from sid_fast.kernels import timing

OP = "cfg_fake_score_loss"
SHAPES = [(8, 16, 32, 32), (4, 16, 64, 64)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["torch", "compile", "cpp"] + (["triton"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fake_score_loss_fwd_bwd(benchmark, shape, provider):
    args = timing.make_inputs(OP, shape, torch.float32, device=DEVICE)
    step = timing.make_step(OP, provider, args, "fwd+bwd")
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = timing.latent_bytes(OP, args, "fwd+bwd") / benchmark.stats.stats.median / 1e9


def main(csv_path: str = "benchmarks/results/kernels_cpu.csv") -> None:
    rows = []
    for shape in SHAPES:
        rows += timing.time_op(OP, PROVIDERS, shape, torch.float32, DEVICE, repeat=30)
    print(timing.table(rows))
    timing.append_csv(rows, csv_path)


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    main(*sys.argv[1:])
