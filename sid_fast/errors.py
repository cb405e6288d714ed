"""Errors the user can fix, told apart from bugs (docs/reliability.md).

`UserError` (a `ValueError`) is raised where input is validated: the config and its overrides, command-line values,
files and directories, prompt files, shards, checkpoints, teacher directories. Its message names the thing first
(a file, a config field, an option) and says what is wrong with it. The `sid-fast` command prints it as ONE line,
`sid-fast <command>: error: <message>`, and exits with status 2; anything else is a bug in sid_fast and keeps its
traceback (`is_user_error`).

    UserError                   ValueError subclass: `except ValueError` in older code still catches it
      ConfigError               a config file (YAML syntax, unknown field), an override, a preset
      InputError                a file or directory the user named (prompt files, teacher directories, --out)
      CheckpointError           sid_fast.checkpoint: a checkpoint is missing, incomplete, corrupt, or cannot be written
                                (CheckpointWriteError: also an OSError, for a full disk)
      ShardError, BadDataError  sid_fast.data: a shard directory is unusable; too much bad data in a stream
    RankLostError               (a RuntimeError, not a user error) another rank of a distributed run died or hangs
"""

from __future__ import annotations

import linecache
import re
import traceback
from pathlib import Path


def _package_dirs() -> tuple[str, ...]:
    """sid_fast's own source folders: the package and its fused-op registry (`kernels/`, installed as sid_fast.kernels)."""
    import importlib.util

    dirs = [str(Path(__file__).resolve().parent)]
    try:
        spec = importlib.util.find_spec("sid_fast.kernels")
        if spec is not None and spec.origin:
            dirs.append(str(Path(spec.origin).resolve().parent))
    except (ImportError, ValueError):
        pass
    return tuple(dirs)


class UserError(ValueError):
    """Something the user gave is wrong; the message names it and says what is wrong (one line on the CLI)."""


class ConfigError(UserError):
    """A config file, an override or a preset is wrong (YAML syntax, unknown field, bad value)."""


class InputError(UserError):
    """A file or directory the user named cannot be used (missing, wrong type, not text, wrong family, ...)."""


class RankLostError(RuntimeError):
    """Another rank of a distributed run died or stopped answering; the message names it."""


def _raised_by_a_raise_in_sid_fast(error: BaseException) -> bool:
    """Whether `error` left a `raise` statement in sid_fast's own code (not a library, not a builtin call)."""
    tb = error.__traceback__
    if tb is None:
        return False
    last = traceback.extract_tb(tb)[-1]
    if not str(Path(last.filename).resolve()).startswith(_package_dirs()):
        return False
    line = linecache.getline(last.filename, last.lineno).strip() if last.lineno else ""
    return line.startswith("raise ")


def is_user_error(error: BaseException) -> bool:
    """True for errors in what the user gave or in their machine's state; False for bugs (keep their traceback).

    - UserError and its subclasses;
    - an OSError the system raised (it carries an errno: a missing or unreadable file, a full disk);
    - transitional, for modules that still raise plain exceptions for bad input: a ValueError, or an OSError
      without errno, raised by a `raise` statement in sid_fast's own code (config.py's `config field ...: ...`
      convention). A ValueError from a library or a builtin (unpacking, int() of internal data) stays a bug.
    """
    if isinstance(error, UserError):
        return True
    if isinstance(error, OSError) and error.errno is not None:
        return True
    if isinstance(error, (ValueError, OSError)):
        return _raised_by_a_raise_in_sid_fast(error)
    return False


_WORKER_TRACEBACK = re.compile(r"Original Traceback \(most recent call last\):")


def one_line(error: BaseException) -> str:
    """The error's message on one line: an exception re-raised from a DataLoader worker keeps only its own message
    (not the worker's traceback); an OSError reads `<file>: <reason>`; newlines become spaces."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        text = f"{where}{error.strerror}"
        if error.filename2 is not None:
            text += f" (-> {error.filename2})"
    else:
        text = str(error) or type(error).__name__
        if _WORKER_TRACEBACK.search(text):  # "Caught X in DataLoader worker process 0.\nOriginal Traceback ...\nX: msg"
            last = [line for line in text.splitlines() if line.strip()][-1]
            text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(text.split())


# ---------------------------------------------------------------- a rank of a distributed run is lost

_COMM_FAILURE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|closed by peer|broken pipe|timed out|timeout|"
                           r"socket|DistBackendError|DistNetworkError|DistStoreError", re.IGNORECASE)


def lost_rank_error(error: BaseException, wait_s: float | None = None) -> RankLostError | None:
    """After `error` in a distributed run, find which ranks no longer answer; None when it is not that.

    Every rank whose collective failed checks in under a key of the rendezvous store and waits at most `wait_s`
    (default SID_FAST_LOST_RANK_WAIT_S, else a quarter of SID_FAST_DIST_TIMEOUT_S, at most 30 s) for the others:
    the ranks that never check in died or hang. With gloo a dead peer fails the collective at once (connection
    reset) and a hung one after the collective timeout (init_distributed's SID_FAST_DIST_TIMEOUT_S), so a surviving
    rank exits within that timeout plus `wait_s`, naming the lost rank, instead of waiting forever. When the store
    itself is gone (it lives in rank 0 under a plain env:// launch), rank 0 is the one lost. Only the default
    process group's store is used; a rank stuck in a collective with other live ranks checks in late and may be
    named too (it is stuck, and the run stops either way).
    """
    if isinstance(error, RankLostError) or not isinstance(error, RuntimeError) or not _COMM_FAILURE.search(str(error)):
        return None
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    import os
    from datetime import timedelta

    rank, world = dist.get_rank(), dist.get_world_size()
    if wait_s is None:
        try:
            wait_s = float(os.environ.get("SID_FAST_LOST_RANK_WAIT_S", "nan"))
            if not wait_s > 0:
                wait_s = min(30.0, float(os.environ.get("SID_FAST_DIST_TIMEOUT_S", "600")) / 4)
        except ValueError:
            wait_s = 30.0
    cause = re.sub(r"^\[[^\]]*\]\s*", "", one_line(error))  # gloo's "[.../pair.cc:537] " source prefix
    cause = cause.split(". This is typically", 1)[0]  # and its generic advice
    cause = cause if len(cause) <= 160 else cause[:160] + "..."
    prefix = f"sid_fast/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{prefix}{rank}", "1")
    except Exception as store_error:  # noqa: BLE001 - any failure to reach the store means its host is gone
        return RankLostError(f"rank {rank} of {world}: a collective failed ({cause}) and the rendezvous store is "
                             f"unreachable ({one_line(store_error)[:120]}): rank 0 (which hosts it under a plain "
                             "launch) or the launcher is lost; this rank stops")
    others = {r: f"{prefix}{r}" for r in range(world) if r != rank}
    try:
        store.wait(list(others.values()), timedelta(seconds=wait_s))
        return None  # every rank answered: not a lost rank, the original error stands
    except Exception:  # noqa: BLE001 - a timeout (DistStoreError) or the store going away
        pass
    lost = []
    for r, key in others.items():
        try:
            if not store.check([key]):
                lost.append(r)
        except Exception:  # noqa: BLE001
            lost.append(r)
    if not lost:
        return None
    names = ", ".join(map(str, lost))
    return RankLostError(f"rank{'s' if len(lost) > 1 else ''} {names} of {world} lost: a collective failed on rank {rank} "
                         f"({cause}) and rank{'s' if len(lost) > 1 else ''} {names} did not answer within {wait_s:g} s "
                         "(died or hangs; see its log); this rank stops")
