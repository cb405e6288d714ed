"""SiD iteration time and per-rank memory: local engine vs DeepSpeed ZeRO-3 on 1 and 2 processes (CPU, gloo).

A tiny DiT stand-in (VelocityMLP teacher, fake score and generator, hidden 256) trained for ITERATIONS
iterations by tests/engine_worker.py; the time is the median iteration measured inside the run (no start-up, no checkpoint).
Rows are appended to benchmarks/results/engine_cpu.csv.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python -m pytest benchmarks/bench_engine.py --benchmark-columns=median,rounds -s
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS, HIDDEN, BATCH = 20, 256, 32
RESULTS = ROOT / "benchmarks" / "results" / "engine_cpu.csv"
CASES = {"local-1proc": ("python", 1, "local"), "zero3-1proc": ("python", 1, "deepspeed"),
         "zero3-2proc": ("torchrun", 2, "deepspeed")}


def _git_sha() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def _launch(out: Path, launcher: str, nproc: int, engine: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", SID_TEST_HIDDEN=str(HIDDEN))
    env.pop("RANK", None)
    head = [sys.executable] if launcher == "python" else [str(Path(sys.executable).parent / "torchrun"),
                                                          f"--nproc_per_node={nproc}", f"--master_port={29900 + os.getpid() % 90}"]
    cmd = head + ["tests/engine_worker.py", str(out), f"engine.kind={engine}", f"train.iterations={ITERATIONS}",
                  f"train.batch_size={BATCH}", "train.ema_decay=0.0"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return [json.loads((out / f"memory-rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.mark.parametrize("case", list(CASES))
def test_sid_iteration_engine(benchmark, case, tmp_path):
    launcher, nproc, engine = CASES[case]
    ranks = benchmark.pedantic(_launch, args=(tmp_path, launcher, nproc, engine), rounds=1, iterations=1)
    seconds = max(r["step_seconds_median"] for r in ranks)  # median iteration, checkpoint saving excluded
    row = {
        "case": case, "processes": nproc, "hidden": HIDDEN, "batch_per_rank": BATCH,
        "s_per_iteration": seconds, "images_per_s": 2 * BATCH * nproc / seconds,
        "params_bytes_per_rank": {n: ranks[0][n] for n in ("teacher", "fake_score", "generator")} if engine != "local" else "full",
        "model_state_bytes_per_rank": ranks[0].get("generator_model_states", ""),
        "peak_rss_mb_per_rank": max(r["peak_rss_bytes"] for r in ranks) / 2**20,
        "device": f"{platform.machine()} CPU ({os.environ.get('OMP_NUM_THREADS', '?')} threads/rank)",
        "torch_version": torch.__version__, "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    benchmark.extra_info.update(row)
    print(json.dumps(row))
    new = not RESULTS.is_file()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})
