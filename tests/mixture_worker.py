"""Worker for tests/test_sid_mixture.py: runs exact-mixture SiD distillations (the demo preset,
sid_fast/presets/mixture_ring8.yaml, plus each job's overrides) one after another at one thread, and writes each
EMA generator's state dict to the job's file (written under a temporary name and renamed, so a file that exists is
complete). tests/mixture_lanes.py starts two of these side by side when the test session starts; a worker whose
test process is gone (even SIGKILLed, with no chance to stop it) exits within a few seconds.

    python tests/mixture_worker.py '[{"preset": "ring8", "overrides": [...], "dir": DIR, "out": FILE}, ...]'
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch


def exit_with_parent(interval: float = 2.0) -> None:
    """A daemon thread that ends this process (status 3) once its parent has gone (the worker is re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(3)  # no message: its reader may be the process that is gone (a print could raise BrokenPipeError)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main() -> None:
    exit_with_parent()
    from sid_fast.config import TeacherConfig, load_config
    from sid_fast.demo.mixture import PRESET, distill_generator
    from sid_fast.models.registry import build_teacher

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as tests/conftest.py sets for the test process
    for job in json.loads(sys.argv[1]):
        bundle = build_teacher(TeacherConfig(kind="mixture", preset=job["preset"]))
        config = load_config(PRESET, [f"teacher.preset={job['preset']}", f"train.out_dir={job['dir']}",
                                      "train.progress=false"] + job["overrides"])
        state = distill_generator(config, bundle).engine.generator_state_dict(ema=True)
        tmp = job["out"] + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, job["out"])
        print(f"[mixture worker] wrote {job['out']}", flush=True)


if __name__ == "__main__":
    main()
