"""Timing of op backends against eager PyTorch and `torch.compile` (used by `sid-fast kernels bench`,
benchmarks/bench_*.py and benchmarks/gpu/run.sh). Bandwidth is counted analytically: every latent tensor is read
once by the forward; the backward reads them again and writes one gradient per latent input."""

from __future__ import annotations

import csv
import datetime
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from sid_fast.kernels.conformance import make_inputs
from sid_fast.kernels.registry import call, get_op, ineligible_reason

BENCH_SHAPES: dict[str, tuple[int, ...]] = {
    "adaln_modulation": (4, 256, 1152), "gated_residual": (4, 256, 1152), "rms_norm": (4, 256, 16, 64),
    "weighted_rms_norm": (4, 256, 16, 64), "rotary_qk": (2, 256, 16, 64)}
"""Default `sid-fast kernels bench` shape per block op (DiT-XL width 1152, head dim 64); the losses: 4x16x32x32."""


def bench_shape(op: str) -> tuple[int, ...]:
    return BENCH_SHAPES.get(op, (4, 16, 32, 32))


@dataclass
class Timing:
    """One measured (op, provider, mode, shape, dtype): milliseconds and GB/s of the median."""

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gb_per_s: float
    device: str
    torch_version: str
    git_sha: str
    date: str


def latent_bytes(op: str, args: list, mode: str, out: Tensor | None = None) -> int:
    """Analytic bytes moved: reads of every latent input (and the write of an output of that kind, e.g. the block
    ops' activations; the losses' (B,) output is not counted), plus (fwd+bwd) re-reads, one gradient write per input
    and the read of the output's gradient."""
    latents = [a for a in args if isinstance(a, Tensor) and a.ndim >= 2]
    one_pass = sum(a.numel() * a.element_size() for a in latents)
    out_bytes = out.numel() * out.element_size() if out is not None and out.ndim >= 2 else 0
    return one_pass + out_bytes if mode == "fwd" else 3 * one_pass + 2 * out_bytes


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU ({torch.get_num_threads()} threads)"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, repeat: int, warmup: int = 2) -> list[float]:
    """Wall-clock milliseconds of `repeat` calls of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def make_step(op: str, provider: str, args: list, mode: str):
    """A closure running op `op` with `provider` (a backend or `compile`) once, forward or forward+backward."""
    spec = get_op(op)
    leaves = [a.detach().requires_grad_(mode != "fwd") if isinstance(a, Tensor) else a for a in args]
    if provider == "compile":
        compiled = torch.compile(spec.reference, dynamic=False)

        def run_op(*values):
            return compiled(*values)
    else:
        def run_op(*values):
            return call(op, *values, backend=provider)

    with torch.no_grad():
        grad_out = torch.ones_like(spec.reference(*args))
    tensors = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return run_op(*leaves)
        out = run_op(*leaves)
        return torch.autograd.grad(out, tensors, grad_out)

    return step


def time_op(op: str, providers: list[str], shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
            modes: tuple[str, ...] = ("fwd", "fwd+bwd"), repeat: int = 10) -> list[Timing]:
    """Time every provider (registered backends, `torch` = eager reference, `compile`) on one input set.

    Providers are interleaved round by round, so load from other processes on a shared machine hits all alike.
    """
    args = make_inputs(op, shape, dtype, device=device)
    steps = {}
    for provider in providers:
        if provider != "compile" and (reason := ineligible_reason(op, provider, args)) is not None:
            print(f"skip {op} {provider}: {reason}")
            continue
        for mode in modes:
            steps[provider, mode] = make_step(op, provider, args, mode)
            measure(steps[provider, mode], device, repeat=0, warmup=3)  # compile, build, caches
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(repeat):
        for key, step in steps.items():
            samples[key] += measure(step, device, repeat=1, warmup=0)
    with torch.no_grad():
        out = get_op(op).reference(*args)
    rows, sha, date = [], git_sha(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for (provider, mode), times in samples.items():
        median, p20, p80 = (torch.quantile(torch.tensor(times), q).item() for q in (0.5, 0.2, 0.8))
        rows.append(Timing(op, provider, mode, "x".join(map(str, shape)), str(dtype).replace("torch.", ""),
                           median, p20, p80, latent_bytes(op, args, mode, out) / (median * 1e-3) / 1e9,
                           device_name(device), torch.__version__, sha, date))
    return rows


def append_csv(rows: list[Timing], path: str | Path) -> None:
    """Append rows to `path` (header written when the file is new): the CSV grows over time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Timing.__dataclass_fields__))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def table(rows: list[Timing], baseline: str = "torch") -> str:
    """Median ms, GB/s and the speed-up against `baseline` (eager PyTorch) per op, mode and shape."""
    base = {(r.op, r.mode, r.shape, r.dtype): r.median_ms for r in rows if r.provider == baseline}
    lines = [f"{'op':<24} {'mode':<8} {'shape':<14} {'dtype':<9} {'provider':<9} {'median ms':>10} {'GB/s':>8} "
             f"{'vs eager':>9}"]
    for r in rows:
        ref = base.get((r.op, r.mode, r.shape, r.dtype))
        ratio = f"{ref / r.median_ms:8.2f}x" if ref else "      n/a"
        lines.append(f"{r.op:<24} {r.mode:<8} {r.shape:<14} {r.dtype:<9} {r.provider:<9} {r.median_ms:>10.3f} "
                     f"{r.gb_per_s:>8.2f} {ratio}")
    return "\n".join(lines)
