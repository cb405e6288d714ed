"""Resume onto a different world size: DeepSpeed's universal checkpoint conversion (`ds_to_universal`).

A ZeRO-3 checkpoint is a set of flat per-rank partitions of weights and Adam states; the universal format
stores every parameter's fp32 weight and optimizer states whole, so any world size can load it. Rank 0
converts each network's sub-directory once, next to the checkpoint (a hidden sibling, outside the manifest),
and every rank then loads with `load_universal`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch.distributed as dist

DONE = "converted.ok"


def convert_to_universal(directory: Path, names: tuple[str, ...], rank: int) -> Path:
    """Universal copy of `directory/<name>` for each name under `<parent>/.universal-<dir>/`; its root."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    directory = Path(directory)
    target = directory.parent / f".universal-{directory.name}"
    if rank == 0 and not (target / DONE).is_file():
        shutil.rmtree(target, ignore_errors=True)
        for name in names:
            args = argparse.Namespace(input_folder=str(directory / name), output_folder=str(target / name),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=False)
            ds_to_universal(args)
        (target / DONE).write_text("ok\n")
    dist.barrier()
    if not (target / DONE).is_file():
        raise RuntimeError(f"universal conversion of {directory} did not complete on rank 0 (see its log)")
    return target
