"""Running a test function on several gloo ranks in one machine, bounded (docs/reliability.md, "Multi-rank tests
under load"): the ranks are `spawn`ed (fork after OpenMP use deadlocks), rendezvous and collectives time out after
RANK_TIMEOUT_S, and the join after RUN_TIMEOUT_S names the ranks still running."""

from __future__ import annotations

import time

import pytest
import torch

RANK_TIMEOUT_S = 120  # rendezvous and each collective: generous for a loaded 2-core machine, but bounded
RUN_TIMEOUT_S = 300  # all ranks, imports included


def run_ranks(fn, args: tuple, nprocs: int, timeout: float = RUN_TIMEOUT_S) -> None:
    """`fn(rank, *args)` in `nprocs` spawned processes, joined with a bound: a rank that fails raises with its
    traceback (torch.multiprocessing names the process = rank); ranks still running at the deadline are named
    and killed."""
    context = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                pytest.fail(f"rank(s) {alive} of {nprocs} did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
