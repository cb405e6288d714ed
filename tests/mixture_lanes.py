"""The exact-mixture distillations of tests/test_sid_mixture.py as background jobs: two worker processes
(tests/mixture_worker.py) at one thread each, side by side; `Lanes.state(name)` waits for one job's generator.
tests/conftest.py starts them when the session starts (if the mixture tests are selected), so that they overlap the
rest of the suite, whose tests leave part of the two cores idle."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("mixture_worker.py")
KAPPAS = [(2.0, 2.0, 2.0), (1.0, 1.0, 2.0)]
"""(κ₁, κ₂, κ₄) of the guided runs."""
JOBS = {
    "1-step": ("ring8", ["method.num_steps=1"]),
    "4-step": ("ring8", ["method.num_steps=4"]),
    **{f"guided-{k1}-{k2}-{k4}": ("ring8-cond4", [
        "train.iterations=800", "method.num_steps=1", f"method.kappa_fake_loss={k1}", f"method.kappa_fake_gen={k2}",
        f"method.kappa_teacher={k4}"]) for k1, k2, k4 in KAPPAS},
}
LANES = [["4-step"], ["1-step", "guided-2.0-2.0-2.0", "guided-1.0-1.0-2.0"]]
"""Two lanes of about equal length (measured at one thread: 4-step 425 s; 1-step 330 s + the two guided runs)."""
JOB_TIMEOUT = 1800.0


class Lanes:
    """The two worker processes and the files their jobs write."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for index, lane in enumerate(LANES):
            jobs = [{"preset": JOBS[name][0], "overrides": JOBS[name][1], "dir": str(root / name),
                     "out": str(self.out(name))} for name in lane]
            log = open(root / f"lane{index}.log", "w")
            proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(jobs)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            log.close()
            self.procs.append((proc, root / f"lane{index}.log", lane))

    def out(self, name: str) -> Path:
        return self.root / f"{name}.pt"

    def state(self, name: str) -> dict:
        """The EMA generator state of job `name`, waiting for it at most JOB_TIMEOUT seconds."""
        proc, log, _ = next(entry for entry in self.procs if name in entry[2])
        deadline = time.monotonic() + JOB_TIMEOUT
        while not self.out(name).is_file():
            if proc.poll() is not None and not self.out(name).is_file():
                pytest.fail(f"mixture job {name}: its worker exited with status {proc.returncode} without writing "
                            f"{self.out(name)}; the worker's log ends:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mixture job {name} did not finish within {JOB_TIMEOUT:.0f} s (worker log {log})")
            time.sleep(0.5)
        return torch.load(self.out(name), weights_only=True)

    def close(self) -> None:
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
