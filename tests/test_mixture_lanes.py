"""The mixture test's background workers (tests/mixture_lanes.py, tests/mixture_worker.py) do not outlive their test
process: killed with SIGKILL, it cannot stop them, so each worker watches its parent and exits when it is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "mixture_worker.py"

CHILD = textwrap.dedent(f"""
    import importlib.util, time
    spec = importlib.util.spec_from_file_location("mixture_worker", {str(WORKER)!r})
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.exit_with_parent(interval=0.1)
    print("watching", flush=True)
    time.sleep(120)
""")

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "watching"
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None


def test_a_worker_exits_when_its_test_process_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if _state(child) == "Z":  # exited, not yet reaped by whatever adopted it
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError(f"worker {child} still alive 20 s after its parent was killed")
