"""Atomic, verified training checkpoints.

Layout under `<out_dir>/checkpoints/`:
  step-00000100/        engine files (weights, optimizers, EMA), rng.safetensors, state.json, manifest.json
  latest                text file naming the newest complete checkpoint directory

A checkpoint is written into a hidden temporary directory, every file is flushed to disk, `manifest.json`
(size and sha256 of every file) is written last, then the directory is renamed into place and `latest`
is replaced atomically. A crash at any point leaves the previous checkpoint as `latest`. Loading verifies
the manifest and names the file that is missing, truncated or altered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = directory / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1))
    _fsync_file(manifest)


def verify(directory: Path) -> None:
    """Raise CheckpointError naming the first file that does not match the manifest."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {MANIFEST} is missing")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} is unreadable ({error})") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: file {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {directory}: file {name} is truncated or altered "
                f"(expected {expected['bytes']} bytes, found {size})"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: file {name} fails its sha256 check")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The directory `latest` points to, or None when no checkpoint was ever completed."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    target = Path(root) / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
    return target


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"trainer": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(state["trainer"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: Path, step: int, engine, state: dict, rng: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    engine.save_state(tmp)
    rank_suffix = f"-rank{engine.rank}" if engine.world_size > 1 else ""
    save_file({k: v.contiguous() for k, v in rng.items()}, tmp / f"rng{rank_suffix}.safetensors")
    engine.barrier()
    if engine.rank == 0:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name)
        _fsync_file(pointer_tmp)
        os.replace(pointer_tmp, root / LATEST)
        _fsync_dir(root)
        _prune(root, keep, final)
    engine.barrier()
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[: max(0, len(complete) - keep)]:
        if old != newest:
            shutil.rmtree(old)


def load_checkpoint(directory: Path, engine, generator: torch.Generator) -> dict:
    """Verify and restore a checkpoint into `engine` and the RNGs; return its trainer state."""
    directory = Path(directory)
    verify(directory)
    engine.load_state(directory)
    rank_suffix = f"-rank{engine.rank}" if engine.world_size > 1 else ""
    rng_file = directory / f"rng{rank_suffix}.safetensors"
    if not rng_file.is_file() and (directory / f"rng-rank{engine.rank}.safetensors").is_file():
        rng_file = directory / f"rng-rank{engine.rank}.safetensors"  # saved by more ranks: this rank's own stream
    if not rng_file.is_file():
        raise CheckpointError(f"checkpoint {directory}: {rng_file.name} missing (saved with another world size?)")
    restore_rng(load_file(rng_file), generator)
    return json.loads((directory / "state.json").read_text())
