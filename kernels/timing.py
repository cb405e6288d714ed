"""Timing of op backends against eager PyTorch and `torch.compile` (used by `sid-fast kernels bench`,
benchmarks/bench_*.py and benchmarks/gpu/check_kernels.py).

Bandwidth is counted analytically (`latent_bytes`): what a one-pass implementation must move. Forward: read every
tensor input once, write the output. Backward: read every tensor input and the output's gradient once, write one
gradient per tensor input. `time_op` times wall clock per synchronised call (what a CPU run or a host-bound GPU
call costs); `device_time_op` (CUDA) separates the device time of a call (CUDA-graph replay, inputs rotated
through enough copies to miss the L2 cache) from its host time (the Python dispatch and launches of un-synchronised
eager calls)."""

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


def _tensor_bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, Tensor))


def latent_bytes(op: str, args: list, mode: str, out: Tensor | None = None) -> int:
    """Bytes a one-pass implementation must move (`op` names the op; the count depends only on the tensors).
    fwd: every tensor input read once + the output written; bwd: every tensor input and the output's gradient read
    once + one gradient per tensor input written; fwd+bwd: both. Per-sample (B,) vectors count too (a few bytes)."""
    inputs, out_bytes = _tensor_bytes(args), _tensor_bytes([out]) if out is not None else 0
    fwd, bwd = inputs + out_bytes, 2 * inputs + out_bytes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


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
    """A closure running op `op` with `provider` (a backend, or `compile` = torch.compile of the reference where the
    op has no registered `compile` backend) once, forward or forward+backward. Registered backends run through the
    registry, as the trainer calls them."""
    spec = get_op(op)
    leaves = [a.detach().requires_grad_(mode != "fwd") if isinstance(a, Tensor) else a for a in args]
    if provider == "compile" and provider not in spec.implementations:
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
    reset_compile(providers)
    steps = {}
    for provider in providers:
        if _known(op, provider) and (reason := ineligible_reason(op, provider, args)) is not None:
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


def _known(op: str, provider: str) -> bool:
    return provider in get_op(op).implementations or provider == "torch"


def reset_compile(providers) -> None:
    """A fresh torch.compile per input set: without it the `compile` backend, compiled once per op, would meet a
    second shape or dtype with a recompile marked dynamic, which is not what a training run (one shape) runs."""
    if "compile" in providers:
        from sid_fast.kernels.ops import reset_compiled

        torch._dynamo.reset()
        reset_compiled()


def append_csv(rows: list, path: str | Path) -> None:
    """Append rows (dataclasses of one kind) to `path` (header written when the file is new): the CSV grows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(type(rows[0]).__dataclass_fields__) if rows else [])
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


# ---------------------------------------------------------------- device time on CUDA (benchmarks/gpu/check_kernels.py)


@dataclass
class DeviceTiming:
    """One (op, provider, mode, shape, dtype) on a GPU, per call.

    device_ms: CUDA-graph replay of `calls` calls (no host in the loop), the inputs rotated through `sets` copies
      whose total exceeds 3x the L2 cache, median of the replays; bwd = (fwd+bwd) - fwd.
    eager_ms: wall time of back-to-back eager calls synchronised once at the end (pipelined), median of rounds.
    host_ms: host time of those calls before the synchronisation: the Python dispatch and launches per call.
    gb_per_s, copy_fraction: `latent_bytes` / device_ms, and that over the measured copy bandwidth.
    """

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    device_ms: float
    eager_ms: float
    host_ms: float
    bytes: int
    gb_per_s: float
    copy_fraction: float
    sets: int
    method: str
    device: str
    torch_version: str
    git_sha: str
    date: str


def l2_bytes(device: str) -> int:
    """The GPU's L2 cache size (64 MiB when the property is missing)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)


def input_sets(nbytes_per_call: int, device: str, most: int = 16) -> int:
    """How many input copies a timing loop rotates through so that each call's inputs left the L2 cache."""
    return max(2, min(most, -(-3 * l2_bytes(device) // max(1, nbytes_per_call))))


def graph_ms(steps: list, calls: int, replays: int = 10) -> float:
    """Device milliseconds per call: `calls` calls of `steps` (round robin) captured in one CUDA graph, replayed
    `replays` times, median. The steps must have run eagerly before (compilation, autotuning, allocator warm-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's documentation asks
        for step in steps:
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            steps[i % len(steps)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def eager_ms(steps: list, device: str, calls: int = 10, rounds: int = 7) -> tuple[float, float]:
    """(wall ms, host ms) per call of `calls` back-to-back eager calls synchronised once at the end, median of
    `rounds`. Host ms stops before the synchronisation: the Python and launch cost of a call (a few hundred launches
    stay under the launch queue's depth, so the host does not wait on the device)."""
    walls, hosts = [], []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for i in range(calls):
            steps[i % len(steps)]()
        host = time.perf_counter()
        _sync(device)
        end = time.perf_counter()
        walls.append((end - start) * 1e3 / calls)
        hosts.append((host - start) * 1e3 / calls)
    return sorted(walls)[rounds // 2], sorted(hosts)[rounds // 2]


def copy_graph_gbps(nbytes: int, device: str, calls: int = 40) -> float:
    """GB/s (read + write counted) of device-to-device copies moving `nbytes` per copy, timed like the ops: in a
    CUDA graph, rotating through enough buffers to miss the L2 cache."""
    numel = max(1, nbytes // 8)  # nbytes/2 read + nbytes/2 written, fp32
    pairs = [(torch.empty(numel, device=device), torch.empty(numel, device=device))
             for _ in range(input_sets(nbytes, device))]
    steps = [lambda source=source, target=target: target.copy_(source) for source, target in pairs]
    return 8 * numel / (graph_ms(steps, calls) * 1e-3) / 1e9


def device_time_op(op: str, providers: list[str], shape: tuple[int, ...], dtype: torch.dtype, device: str = "cuda",
                   modes: tuple[str, ...] = ("fwd", "fwd+bwd"), copy_gbps: float | None = None,
                   calls: int = 40) -> list[DeviceTiming]:
    """Device time, eager wall time and host time per call of every provider (see `DeviceTiming`), fwd and
    fwd+bwd measured, bwd derived. A provider whose graph capture fails keeps its eager times, the error in
    `method`. CUDA only."""
    reset_compile(providers)
    probe = make_inputs(op, shape, dtype, device=device)
    with torch.no_grad():
        out = get_op(op).reference(*probe)
    sets = input_sets(min(latent_bytes(op, probe, mode, out) for mode in modes), device)  # the lightest mode's
    inputs = [probe] + [make_inputs(op, shape, dtype, seed=k, device=device) for k in range(1, sets)]
    measured: dict[tuple[str, str], tuple[float, float, float, str]] = {}
    for provider in providers:
        if _known(op, provider) and (reason := ineligible_reason(op, provider, probe)) is not None:
            print(f"skip {op} {provider}: {reason}")
            continue
        for mode in modes:
            steps = [make_step(op, provider, args, mode) for args in inputs]
            for step in steps * 2:  # compile, build, autotune, allocator
                step()
            wall, host = eager_ms(steps, device)
            try:
                device_ms, method = graph_ms(steps, max(calls, len(steps))), "cuda_graph"
            except Exception as error:  # a provider that cannot be captured: keep its eager times, say why
                device_ms, method = float("nan"), f"graph failed: {type(error).__name__}: {str(error)[:80]}"
                torch.cuda.synchronize()
            measured[provider, mode] = (device_ms, wall, host, method)
    for provider in {p for p, _ in measured}:
        if (provider, "fwd") in measured and (provider, "fwd+bwd") in measured:
            both, fwd = measured[provider, "fwd+bwd"], measured[provider, "fwd"]
            measured[provider, "bwd"] = (both[0] - fwd[0], both[1] - fwd[1], both[2] - fwd[2],
                                         f"derived ({both[3]})")
    rows, sha, date = [], git_sha(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    order = {m: i for i, m in enumerate(("fwd", "bwd", "fwd+bwd"))}
    for (provider, mode), (device_ms, wall, host, method) in sorted(
            measured.items(), key=lambda kv: (order.get(kv[0][1], 9), providers.index(kv[0][0]))):
        nbytes = latent_bytes(op, probe, mode, out)
        gbps = nbytes / (device_ms * 1e-3) / 1e9 if device_ms > 0 else float("nan")
        rows.append(DeviceTiming(op, provider, mode, "x".join(map(str, shape)), str(dtype).replace("torch.", ""),
                                 device_ms, wall, host, nbytes, gbps, gbps / copy_gbps if copy_gbps else float("nan"),
                                 sets, method, device_name(device), torch.__version__, sha, date))
    return rows


def device_table(rows: list[DeviceTiming], same_size_copy: dict[tuple[str, str, str], float] | None = None) -> str:
    """Per row: device µs, eager µs, host µs, GB/s, % of the copy bandwidth (and of a same-size copy when given)."""
    lines = [f"{'op':<24} {'mode':<8} {'shape':<14} {'dtype':<9} {'provider':<8} {'device us':>10} {'eager us':>9} "
             f"{'host us':>8} {'MB':>7} {'GB/s':>7} {'% copy':>7} {'% same-size copy':>17}  method"]
    for r in rows:
        same = (same_size_copy or {}).get((r.op, r.shape, r.dtype, r.mode))
        same_text = f"{100 * r.gb_per_s / same:16.1f}%" if same else f"{'':>17}"
        lines.append(f"{r.op:<24} {r.mode:<8} {r.shape:<14} {r.dtype:<9} {r.provider:<8} {1e3 * r.device_ms:>10.1f} "
                     f"{1e3 * r.eager_ms:>9.1f} {1e3 * r.host_ms:>8.1f} {r.bytes / 1e6:>7.1f} {r.gb_per_s:>7.0f} "
                     f"{100 * r.copy_fraction:>6.1f}% {same_text}  {r.method}")
    return "\n".join(lines)


def loss_winners(rows: list[DeviceTiming], key: str = "device_ms") -> dict[tuple[str, str, str], list[str]]:
    """Per (device type, dtype, shape): the providers ranked by the summed forward+backward time (`key`) of the
    two loss ops, the measure `kernels.loss_backend=auto` ranks by (one SiD iteration runs each op once forward
    and backward). Providers missing an op or a number are left out."""
    totals: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for r in rows:
        if r.mode == "fwd+bwd":
            value = getattr(r, key)
            totals.setdefault(("cuda" if "CPU" not in r.device else "cpu", r.dtype, r.shape), {}).setdefault(
                r.provider, []).append(value)
    ranked = {}
    for case, by_provider in totals.items():
        complete = {p: sum(v) for p, v in by_provider.items()
                    if len(v) == max(len(x) for x in by_provider.values()) and all(x == x for x in v)}
        ranked[case] = sorted(complete, key=complete.get)
    return ranked
