"""Atomic, verified training checkpoints.

Layout under `<out_dir>/checkpoints/`:
  step-00000100/        engine files (weights, optimizers, EMA), rng.safetensors, state.json, manifest.json
  latest                text file naming the newest complete checkpoint directory

A checkpoint is written into a hidden temporary directory, every file is flushed to disk, `manifest.json`
(size and sha256 of every file) is written last, then the directory is renamed into place and `latest`
is replaced atomically. A crash at any point (SIGKILL included) leaves `latest` naming a complete checkpoint:
the directory `latest` names is never deleted or renamed before `latest` names another one, and old checkpoints
are pruned by renaming them out of the `step-*` namespace first. A failed write (a full disk) removes the partial
checkpoint and raises CheckpointError naming the intact previous one. Loading verifies the manifest and names the
file that is missing, truncated or altered (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sid_fast.errors import UserError

MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
DELETE_PREFIX = ".del-"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be written (a UserError: one line on the CLI)."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (full disk, quota, permissions): also an OSError, like its cause."""


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
        files = json.loads(manifest.read_bytes().decode("utf-8"))["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # bad UTF-8/JSON, missing or wrong fields
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} is unreadable or altered "
                              f"({type(error).__name__}: {' '.join(str(error).split())[:120]})") from None
    for name, size_expected, sha_expected in entries:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: file {name} is missing")
        size = path.stat().st_size
        if size != size_expected:
            raise CheckpointError(
                f"checkpoint {directory}: file {name} is truncated or altered "
                f"(expected {size_expected} bytes, found {size})"
            )
        if _sha256(path) != sha_expected:
            raise CheckpointError(f"checkpoint {directory}: file {name} fails its sha256 check")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The directory `latest` points to, or None when no checkpoint was ever completed."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or "/" in name or name.startswith("."):
        others = sorted(p.name for p in Path(root).glob("step-*") if p.is_dir())
        raise CheckpointError(f"{pointer} is altered (it should name a checkpoint directory); checkpoints in "
                              f"{root}: {others}")
    target = Path(root) / name
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


def _pointed(root: Path) -> str | None:
    """The name `latest` holds, or None."""
    try:
        return (root / LATEST).read_text().strip() or None
    except (OSError, ValueError):
        return None


# how libraries report a failed write: safetensors "I/O error: No space left on device (os error 28)", torch.save
# "PytorchStreamWriter failed writing file ..." / "[enforce fail at inline_container.cc] . unexpected pos"
_WRITE_FAILURE = re.compile(r"I/O error|os error \d+|PytorchStreamWriter|inline_container|file write failed", re.IGNORECASE)


def _write_failure(error: BaseException, root: Path) -> str | None:
    """Why a checkpoint write failed when `error` is a failed write (an OSError, or a library's wrapping of one),
    with the free space left; None for anything else (a bug, a lost rank), which must propagate as it is."""
    if isinstance(error, OSError) and not isinstance(error, CheckpointError):
        reason = error.strerror or str(error)
        if error.filename:
            reason = f"{reason} ({error.filename})"
    else:
        text = " ".join(str(error).split())
        if not _WRITE_FAILURE.search(text):
            return None
        code = re.search(r"os error (\d+)", text)
        reason = os.strerror(int(code.group(1))) if code else f"the write failed ({text[:120]})"
    try:
        reason += f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        pass
    return reason


def _final_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` goes: `step-N`, or `step-N.K` when `step-N` is the one `latest` names (saving the
    same step again, e.g. at the end of a resumed run): that directory must survive until `latest` moves."""
    final = root / step_dir_name(step)
    current = _pointed(root)
    version = 1
    while final.name == current:
        final = root / f"{step_dir_name(step)}.{version}"
        version += 1
    return final


def _set_latest(root: Path, final: Path) -> None:
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name)
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that it vanishes at once (a rename), then its files."""
    if not path.exists():
        return
    doomed = path.with_name(f"{DELETE_PREFIX}{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(root: Path, step: int, engine, state: dict, rng: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints.

    A failed write (a full disk, a quota, permissions: an OSError, or a library's error wrapping one) removes the
    partial checkpoint and raises CheckpointWriteError naming the checkpoint and the intact previous one; `latest`
    is unchanged. All ranks must see the same `latest` (one shared directory, as DeepSpeed's sharded save needs).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = _final_dir(root, step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    try:
        if engine.rank == 0:
            for leftover in (*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"{DELETE_PREFIX}*")):  # from a killed save
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir()
        engine.barrier()
        engine.save_state(tmp)
        rank_suffix = f"-rank{engine.rank}" if engine.world_size > 1 else ""
        save_file({k: v.contiguous() for k, v in rng.items()}, tmp / f"rng{rank_suffix}.safetensors")
        engine.barrier()
        if engine.rank == 0:
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            write_manifest(tmp)
            _remove(final)  # a complete or partial step-N that `latest` does not name (a save killed before it moved)
            os.replace(tmp, final)
            _set_latest(root, final)
    except Exception as error:
        reason = _write_failure(error, root)
        if reason is None:
            raise
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # free the space the partial checkpoint took
        previous = _pointed(root)
        kept = (f"the previous checkpoint {root / previous} is intact and `latest` still names it" if previous
                else "no earlier checkpoint exists")
        raise CheckpointWriteError(f"{root}: could not write checkpoint {final.name}: {reason}; {kept}") from error
    if engine.rank == 0:
        _prune(root, keep, final)
    engine.barrier()
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[: max(0, len(complete) - keep)]:
        if old != newest:
            _remove(old)


def load_checkpoint(directory: Path, engine, generator: torch.Generator) -> dict:
    """Verify and restore a checkpoint into `engine` and the RNGs; return its trainer state."""
    directory = Path(directory)
    verify(directory)
    try:
        engine.load_state(directory)
    except RuntimeError as error:  # torch's load_state_dict: missing/unexpected keys, size mismatches
        if "state_dict" not in str(error) and "size mismatch" not in str(error):
            raise
        first = " ".join(str(error).split())[:200]
        raise CheckpointError(f"checkpoint {directory} does not fit this run's networks (saved with another teacher, "
                              f"student or config?): {first}") from None
    rank_suffix = f"-rank{engine.rank}" if engine.world_size > 1 else ""
    rng_file = directory / f"rng{rank_suffix}.safetensors"
    if not rng_file.is_file() and (directory / f"rng-rank{engine.rank}.safetensors").is_file():
        rng_file = directory / f"rng-rank{engine.rank}.safetensors"  # saved by more ranks: this rank's own stream
    if not rng_file.is_file():
        raise CheckpointError(f"checkpoint {directory}: {rng_file.name} missing (saved with another world size?)")
    restore_rng(load_file(rng_file), generator)
    return json.loads((directory / "state.json").read_text())
