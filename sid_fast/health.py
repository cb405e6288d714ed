"""Training health signals (DESIGN.md §7: "knowing when training has converged or collapsed").

- `NonFiniteGuard`: every watched tensor (teacher / fake-score / generator outputs) and every loss is checked
  before its backward; a NaN/inf either stops the run (`NonFiniteError`) or skips that network's update, with a
  diagnostic naming the step, the network and the tensor. Nothing is masked (NaNs are never replaced). All ranks agree on
  the verdict (one all-reduce), so a skip never desynchronises ZeRO-3 collectives.
- `FlopCounter`: analytic FLOPs from forward hooks on models that give `forward_flops(batch_shape)`; with
  `health.peak_tflops` it yields MFU.
- `CollapseMonitor`: mean pairwise distance among a fixed-seed generator batch; warns when it falls.
- `LogSinks`: jsonl (always), TensorBoard (installed) and Weights & Biases (only when importable).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import resource
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger("sid_fast.health")


class NonFiniteError(FloatingPointError):
    """A loss or tensor became NaN/inf; the message names the step, network and tensor."""


def describe_nonfinite(value: Tensor) -> str:
    """'3 NaN, 1 inf of 64 elements' for a tensor holding non-finite values."""
    value = value.detach()
    nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    return f"{nan} NaN, {inf} inf of {value.numel()} elements, shape {tuple(value.shape)}"


MAX_PENDING = 4096
"""Deferred checks kept on the device before they are read even without a log line."""


class NonFiniteGuard:
    """Collects the first non-finite tensor of the current update and decides stop / skip.

    mode: `stop` or `skip`; check_tensors: False checks only the losses (`watch` becomes a no-op).
    deferred (stop mode only): the checks stay on the device, with no host sync per step: each watched tensor
    adds one device scalar (its count of non-finite elements) to a list, and `flush()` (called every
    `train.log_every` iterations, before checkpoints and evaluations) reads them all at once and raises naming the
    first bad step, network and tensor. Until then the run goes on: a NaN can reach the weights, but no checkpoint
    or export is written past it. Immediate mode (and `skip`, which must decide before the optimizer step) checks
    each update before its backward at the cost of one host sync per watched tensor.
    """

    def __init__(self, mode: str = "stop", check_tensors: bool = True, engine=None, deferred: bool = False):
        if mode not in ("stop", "skip"):
            raise ValueError(f"config field health.on_nonfinite: must be stop or skip, got {mode!r}")
        self.mode, self.check_tensors, self.engine = mode, check_tensors, engine
        self.deferred = deferred and mode == "stop"
        self.step = 0
        """The iteration being run (set by the trainer), recorded with a deferred problem."""
        self.problems: list[str] = []
        self.skipped: list[dict] = []
        self._pending: list[tuple[int, str, str, tuple[int, ...], Tensor]] = []

    def watch(self, value: Tensor, network: str, tensor: str) -> None:
        """Record `value` (output of `network`) when it holds NaN/inf (immediate mode: one device sync)."""
        if not self.check_tensors:
            return
        if self.deferred:
            self._record(value, network, tensor)
        elif not bool(torch.isfinite(value.detach()).all()):
            self.problems.append(f"{tensor} of the {network} ({describe_nonfinite(value)})")

    def _record(self, value: Tensor, network: str, tensor: str) -> None:
        """Deferred check: one device reduction (the count of non-finite elements), kept with its step and name."""
        self._pending.append((self.step, network, tensor, tuple(value.shape), torch.isfinite(value.detach()).logical_not().sum()))
        if len(self._pending) >= MAX_PENDING:  # a very long log window: read them now (one sync per MAX_PENDING)
            self.flush()

    def verdict(self, loss: Tensor, step: int, network: str, loss_name: str) -> bool:
        """Called before `network`'s backward. Returns True when the update must be skipped; raises in stop mode.
        Deferred: records the loss and returns False (the check happens at `flush`)."""
        if self.deferred:
            self.step = step
            self._record(loss, network, loss_name)
            return False
        if not bool(torch.isfinite(loss.detach()).all()):
            self.problems.append(f"{loss_name} ({describe_nonfinite(loss)})")
        local = 1.0 if self.problems else 0.0
        flag = torch.tensor(local)
        if self.engine is not None and getattr(self.engine, "world_size", 1) > 1:  # every rank must agree
            flag = self.engine.all_reduce_mean(flag.to(self.engine.device)).cpu()
        problems, self.problems = self.problems, []
        if float(flag) == 0.0:
            return False
        where = "; ".join(problems) if problems else "on another rank"
        message = f"step {step}: non-finite values in the {network} update: {where}"
        if self.mode == "stop":
            raise NonFiniteError(message)
        log.warning("%s; skipping this %s update (health.on_nonfinite=skip)", message, network)
        self.skipped.append({"step": step, "network": network, "where": where})
        return True

    def flush(self) -> None:
        """Deferred mode: read every pending count in one host transfer; raise `NonFiniteError` naming the first
        bad step, its network(s) and tensor(s) (all ranks raise together). No-op in immediate mode."""
        if not self.deferred or not self._pending:
            return
        pending, self._pending = self._pending, []
        counts = torch.stack([entry[-1] for entry in pending])
        bad = (counts > 0).any().float()
        if self.engine is not None and getattr(self.engine, "world_size", 1) > 1:  # every rank must agree
            bad = self.engine.all_reduce_mean(bad.to(self.engine.device))
        values, any_bad = counts.tolist(), float(bad) > 0  # the one sync of the window
        if not any_bad:
            return
        found = [(entry, count) for entry, count in zip(pending, values, strict=True) if count > 0]
        if not found:
            raise NonFiniteError(f"steps up to {self.step}: non-finite values on another rank")
        step = found[0][0][0]
        first = [(entry, count) for entry, count in found if entry[0] == step]
        where = "; ".join(f"{tensor} of the {network} ({count} non-finite (NaN or inf) of {_numel(shape)} elements, "
                          f"shape {shape})" for (_, network, tensor, shape, _), count in first)
        networks = sorted({entry[1] for entry, _ in first})
        raise NonFiniteError(f"step {step}: non-finite values in the {' and '.join(networks)} update: {where} "
                             f"(found at the check after step {self.step}; health.defer_checks=false stops at once)")


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


class FlopCounter:
    """Counts analytic FLOPs of calls to models that define `forward_flops(batch_shape) -> float` (per call).

    A call whose output requires grad is counted 3× (forward + backward ≈ 2× forward), else 1×.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.flops = 0.0
        self.handles = []
        self.counted: list[str] = []
        for name, module in modules.items():
            if hasattr(module, "forward_flops"):
                self.handles.append(module.register_forward_hook(self._hook))
                self.counted.append(name)

    def _hook(self, module, args, output) -> None:
        factor = 3.0 if isinstance(output, Tensor) and output.requires_grad else 1.0
        self.flops += factor * float(module.forward_flops(tuple(args[0].shape)))

    def take(self) -> float:
        flops, self.flops = self.flops, 0.0
        return flops

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (GiB) where there is one, and the process's peak RSS (GiB)."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def mean_pairwise_distance(samples: Tensor) -> float:
    """Mean L2 distance over distinct pairs of (n, ...) samples (float64)."""
    flat = samples.detach().flatten(1).double()
    distances = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(distances.sum() / (n * (n - 1)))


class CollapseMonitor:
    """Warns when sample diversity falls: pairwise distance of a fixed-seed batch below `ratio` × the first value."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.first: float | None = None

    def update(self, samples: Tensor, step: int) -> dict:
        distance = mean_pairwise_distance(samples)
        if self.first is None:
            self.first = distance
        collapsed = distance < self.ratio * self.first
        if collapsed:
            log.warning("step %d: possible mode collapse: mean pairwise distance of the fixed-seed batch is %.4g, "
                        "below %.2f × its first value %.4g", step, distance, self.ratio, self.first)
        return {"pairwise_distance": distance, "collapse_warning": bool(collapsed)}


class LogSinks:
    """jsonl at out_dir/log.jsonl; TensorBoard scalars under out_dir/tb; W&B when importable and a project is set."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, wandb_project: str | None = None, config: dict | None = None):
        self.out_dir = Path(out_dir)
        self.tensorboard, self.wandb_project, self.config = tensorboard, wandb_project, config
        self._tb = None
        self._wandb = None

    def write(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        step = int(record.get("step", 0))
        if self.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self.wandb_project and importlib.util.find_spec("wandb") is not None:
            if self._wandb is None:
                import wandb

                self._wandb = wandb.init(project=self.wandb_project, dir=str(self.out_dir), config=self.config)
            self._wandb.log(scalars, step=step)

    def image(self, tag: str, image_hwc, step: int) -> None:
        """Log a uint8 (H, W, 3) numpy image to TensorBoard / W&B (the PNG itself is written by the caller)."""
        if self.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image_hwc)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
