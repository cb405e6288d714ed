"""Configuration: nested dataclasses with validation, YAML files and `--section.field=value` overrides.

Every field carries a one-line docstring (the string literal under it). `__post_init__` checks raise
`ValueError` naming the field, so a bad value fails before any work is done.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sid_fast.flow import TIME_SCHEMES
from sid_fast.losses import WEIGHTINGS
from sid_fast.sampler import NOISE_MODES


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config field {name}: {message}")


@dataclass
class TeacherConfig:
    kind: str = "mixture"
    """Teacher family: `mixture` (exact toy, §9) or a family registered in `sid_fast.models` (sd3, flux, sana, ...)."""
    path: str | None = None
    """Local directory of a real teacher (a diffusers snapshot). Nothing is downloaded."""
    preset: str | None = None
    """Named built-in configuration (toy mixtures, tiny random DiTs for tests)."""
    dtype: str = "float32"
    """Parameter dtype of the three networks: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        _check(bool(self.kind), "teacher.kind", "must name a teacher family")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "teacher.dtype", f"unknown dtype {self.dtype!r}")
        if self.path is not None:
            _check(Path(self.path).exists(), "teacher.path", f"teacher directory {self.path!r} does not exist")


@dataclass
class TimeConfig:
    scheme: str = "logit_normal"
    """Training-time distribution: logit_normal (default), uniform or shifted."""
    mean: float = math.log(2.0)
    """Mean of u in t = sigmoid(u) for logit_normal."""
    std: float = 1.6
    """Standard deviation of u for logit_normal."""
    shift: float = 1.0
    """Shift s of the `shifted` scheme (and of nothing else: no resolution shift in SiD, §1)."""
    t_min: float = 1e-3
    """Lower clamp of sampled times (keeps 1/t weightings finite)."""
    t_max: float = 1.0
    """Upper clamp of sampled times."""

    def __post_init__(self) -> None:
        _check(self.scheme in TIME_SCHEMES, "method.time.scheme", f"unknown scheme {self.scheme!r}; expected one of {TIME_SCHEMES}")
        _check(self.std > 0, "method.time.std", "must be > 0")
        _check(self.shift > 0, "method.time.shift", "must be > 0")
        _check(0 < self.t_min < self.t_max <= 1, "method.time.t_min/t_max", "need 0 < t_min < t_max <= 1")


@dataclass
class MethodConfig:
    num_steps: int = 4
    """K: number of generator steps at sampling time (§2)."""
    random_steps: bool = True
    """Train with K' ~ U{1..K} per iteration (same on all ranks); False always runs all K steps."""
    t_init: float = 1.0
    """Time of the first generator step."""
    noise: str = "fresh"
    """Noise of the multi-step sampler: fresh, fixed or ddim (§2)."""
    alpha: float = 1.0
    """α of the SiD generator loss (1.0 in the authors' code; original SiD used 1.2)."""
    loss_scale: float = 100.0
    """s: scale of the generator loss."""
    weighting: str = "one_minus_t"
    """λ(t): one_minus_t, one_minus_t_sq, inv_t, inv_t_sq, snr or sid."""
    kappa_fake_loss: float = 4.5
    """κ1: CFG scale of the fake score in its own loss."""
    kappa_fake_gen: float = 4.5
    """κ2: CFG scale of the fake score in the generator loss."""
    kappa_teacher: float = 4.5
    """κ4: CFG scale of the teacher in the generator loss."""
    time: TimeConfig = field(default_factory=TimeConfig)
    """Time sampling of both losses."""

    def __post_init__(self) -> None:
        _check(self.num_steps >= 1, "method.num_steps", f"must be >= 1, got {self.num_steps}")
        _check(0 < self.t_init <= 1, "method.t_init", f"must be in (0, 1], got {self.t_init}")
        _check(self.noise in NOISE_MODES, "method.noise", f"unknown noise mode {self.noise!r}; expected one of {NOISE_MODES}")
        _check(self.weighting in WEIGHTINGS, "method.weighting", f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        _check(self.loss_scale > 0, "method.loss_scale", "must be > 0")
        for name in ("kappa_fake_loss", "kappa_fake_gen", "kappa_teacher"):
            _check(getattr(self, name) >= 0, f"method.{name}", "must be >= 0")


@dataclass
class OptimConfig:
    lr_generator: float = 5e-6
    """Adam learning rate of the generator."""
    lr_fake: float = 5e-6
    """Adam learning rate of the fake score."""
    beta1: float = 0.0
    """Adam β1 (0 in SiD)."""
    beta2: float = 0.999
    """Adam β2."""
    eps: float = 1e-8
    """Adam ε (the pure-bf16 recipe uses 1e-4)."""
    weight_decay: float = 0.0
    """Weight decay (none in SiD)."""
    grad_clip: float = 0.0
    """Clip gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        for name in ("lr_generator", "lr_fake"):
            _check(getattr(self, name) > 0, f"optim.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _check(self.eps > 0, "optim.eps", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")


@dataclass
class TrainConfig:
    iterations: int = 1000
    """Number of SiD iterations (one fake-score update then one generator update each)."""
    batch_size: int = 256
    """Micro-batch per process and update."""
    grad_accum: int = 1
    """Micro-batches accumulated per update of each network."""
    fake_warmup_iters: int = 0
    """Iterations at the start that update only the fake score."""
    ema_decay: float = 0.0
    """EMA decay of the generator (0 disables); warm-up min(decay, (1 + n) / (10 + n))."""
    seed: int = 0
    """Seed of every random draw (noise, times, conditions, K')."""
    out_dir: str = "runs/sid"
    """Where checkpoints, logs and samples go."""
    log_every: int = 10
    """Write a jsonl log line every this many iterations."""
    ckpt_every: int = 0
    """Save a checkpoint every this many iterations (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest; never fewer than 1)."""
    resume: bool = True
    """Resume from `out_dir`'s latest checkpoint when there is one."""
    device: str = "cpu"
    """Torch device of the single-process engine."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        _check(self.iterations >= 0, "train.iterations", "must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.fake_warmup_iters >= 0, "train.fake_warmup_iters", "must be >= 0")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")


@dataclass
class SiDConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Which teacher to distil."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The SiD method (§2–§4)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisers (§6)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, checkpoints and logging."""


# ---------------------------------------------------------------- dict / YAML / overrides


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _coerce(value, annotation, name: str):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) < len(typing.get_args(annotation)):
            return None
        raise ValueError(f"config field {name}: may not be null")
    if origin is not None and args:
        annotation = args[0]
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"config field {name}: expected a boolean, got {value!r}")
    if annotation in (int, float, str):
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"config field {name}: expected an integer, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field {name}: expected {annotation.__name__}, got {value!r}") from None
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(prefix + u for u in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, prefix + name)
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """['method.alpha=1.2', 'train.iterations=10'] -> nested dict (values parsed as YAML scalars)."""
    nested: dict = {}
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: SiDConfig | None = None, cls=SiDConfig):
    """Defaults (or `base`), then the YAML file at `path`, then `overrides`; validated on construction."""
    data = to_dict(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        data = merge(data, loaded)
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def dump_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
