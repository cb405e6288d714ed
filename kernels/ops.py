"""The fused SiD loss ops (DESIGN.md §3, §4), their built-in backends and `kernels.loss_backend=auto`.

The references are `sid_fast.losses.cfg_sid_generator_loss` / `cfg_fake_score_loss`. Backends: `triton`
(kernels/sid_generator_loss.py, kernels/fake_score_loss.py), `cpp` (csrc/, kernels/cpp.py) and `compile`
(torch.compile of the reference, differentiated by autograd). Kernel modules are imported on first use only:
Triton decides at decoration time whether it runs interpreted (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch
from torch import Tensor

from sid_fast import losses
from sid_fast.kernels.registry import backends, call, get_op, register_kernel, register_op

log = logging.getLogger("sid_fast.kernels")

register_op("cfg_sid_generator_loss", losses.cfg_sid_generator_loss)
register_op("cfg_fake_score_loss", losses.cfg_fake_score_loss)
LOSS_OPS = ("cfg_sid_generator_loss", "cfg_fake_score_loss")


def _lazy(module: str, attribute: str):
    def run(*args):
        return getattr(importlib.import_module(module), attribute)(*args)

    run.__name__ = f"{module}.{attribute}"
    return run


def elementwise_reason(big: list[Tensor], per_sample: list[Tensor], devices: tuple[str, ...]) -> str | None:
    """Eligibility shared by the fused losses: same-shape float tensors (B, ...), per-sample (B,) vectors."""
    first = big[0]
    if first.device.type not in devices:
        return f"device {first.device.type} not in {devices}"
    if first.ndim < 2 or first.shape[0] == 0 or first[0].numel() == 0:
        return f"needs a non-empty batch (B, ...) of at least 2 dims, got {tuple(first.shape)}"
    for tensor in big:
        if tensor.shape != first.shape or tensor.device != first.device:
            return f"all latent tensors must share shape and device, got {tuple(tensor.shape)} vs {tuple(first.shape)}"
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {tensor.dtype} not supported"
    for tensor in per_sample:
        if tensor.shape != (first.shape[0],) or tensor.device != first.device:
            return f"per-sample tensors must be ({first.shape[0]},) on {first.device}, got {tuple(tensor.shape)}"
        if not tensor.is_floating_point():
            return f"per-sample tensor dtype {tensor.dtype} is not floating point"
    return None


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _generator_reason(devices_fn):
    def reason(x_t, t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond, teacher_scale, fake_scale,
               weight, alpha, scale):
        return elementwise_reason([x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond], [t, weight],
                                  devices_fn())
    return reason


def _fake_reason(devices_fn):
    def reason(velocity_uncond, velocity_cond, scale, x_g, noise):
        return elementwise_reason([velocity_uncond, velocity_cond, x_g, noise], [], devices_fn())
    return reason


def _cpp_devices() -> tuple[str, ...]:
    from sid_fast.kernels import cpp

    return cpp.devices()


# ---------------------------------------------------------------- `compile`: torch.compile of the reference

_COMPILED: dict[str, object] = {}
_COMPILE_FAILED: dict[str, str] = {}
COMPILE_DEVICES = ("cpu", "cuda")


def reset_compiled() -> None:
    """Forget the compiled references (benchmarks call this with torch._dynamo.reset() between input sets)."""
    _COMPILED.clear()
    _COMPILE_FAILED.clear()


def _compiled_reference(op: str):
    """Backend `compile` of op `op`: torch.compile of its reference, compiled on first call (inductor; per input
    shape and dtype, as torch.compile does), differentiated by autograd (AOTAutograd compiles the backward too).
    Inside an outer torch.compile it returns the reference, which the outer compile traces and fuses itself. If
    compiling fails (e.g. no C++ compiler for inductor on the CPU) the reference runs from then on, logged once."""

    def run(*args):
        reference = get_op(op).reference
        if torch.compiler.is_compiling() or op in _COMPILE_FAILED:
            return reference(*args)
        compiled = _COMPILED.get(op)
        if compiled is None:
            compiled = _COMPILED[op] = torch.compile(reference)
        try:
            return compiled(*args)
        except Exception as error:  # a bad input raises again from the reference below; a compiler failure does not
            out = reference(*args)
            _COMPILE_FAILED[op] = str(error).strip().splitlines()[0][:200] if str(error).strip() else repr(error)
            log.warning("kernel op %s: backend 'compile' failed (%s); running the torch reference from now on",
                        op, _COMPILE_FAILED[op])
            return out

    run.__name__ = f"compiled_{op}"
    return run


def _compile_reason(*args) -> str | None:
    first = next(a for a in args if isinstance(a, Tensor))
    if first.device.type not in COMPILE_DEVICES:
        return f"device {first.device.type} not in {COMPILE_DEVICES}"
    return None


for _op in LOSS_OPS:
    register_kernel(_op, "compile", _compiled_reference(_op), eligible=_compile_reason, direct=True)

register_kernel("cfg_sid_generator_loss", "triton", _lazy("sid_fast.kernels.sid_generator_loss", "forward"),
                _lazy("sid_fast.kernels.sid_generator_loss", "backward"), _generator_reason(_triton_devices))
register_kernel("cfg_fake_score_loss", "triton", _lazy("sid_fast.kernels.fake_score_loss", "forward"),
                _lazy("sid_fast.kernels.fake_score_loss", "backward"), _fake_reason(_triton_devices))
register_kernel("cfg_sid_generator_loss", "cpp", _lazy("sid_fast.kernels.cpp", "generator_forward"),
                _lazy("sid_fast.kernels.cpp", "generator_backward"), _generator_reason(_cpp_devices))
register_kernel("cfg_fake_score_loss", "cpp", _lazy("sid_fast.kernels.cpp", "fake_forward"),
                _lazy("sid_fast.kernels.cpp", "fake_backward"), _fake_reason(_cpp_devices))


# §3 generator loss with both CFG combinations (κ4 teacher, κ2 fake score), per sample (B,) fp32
def cfg_sid_generator_loss(x_t: Tensor, t: Tensor, x_g: Tensor, teacher_uncond: Tensor, teacher_cond: Tensor,
                           fake_uncond: Tensor, fake_cond: Tensor, teacher_scale: float, fake_scale: float,
                           weight: Tensor, alpha: float = 1.0, scale: float = 100.0, *,
                           backend: str | None = None) -> Tensor:
    """Latents (B, ...) of one shape; t, weight (B,). Returns the per-sample loss (B,) in fp32. `backend="auto"`
    resolves per device type and dtype of the velocities (`resolve_loss_backend`, once per pair)."""
    if backend == AUTO:
        backend = _auto_for(teacher_cond)
    return call("cfg_sid_generator_loss", x_t, t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond,
                teacher_scale, fake_scale, weight, alpha, scale, backend=backend)


# §3 fake-score loss on CFG_κ1: sum_elements (v_u + κ1 (v_c - v_u) - (ε - x_g))^2, per sample (B,) fp32
def cfg_fake_score_loss(velocity_uncond: Tensor, velocity_cond: Tensor, scale: float, x_g: Tensor, noise: Tensor, *,
                        backend: str | None = None) -> Tensor:
    """All tensors (B, ...) of one shape. Returns the per-sample loss (B,) in fp32 (`backend="auto"`: as above)."""
    if backend == AUTO:
        backend = _auto_for(velocity_cond)
    return call("cfg_fake_score_loss", velocity_uncond, velocity_cond, scale, x_g, noise, backend=backend)


# §4 CFG_κ as the pair the fused ops combine: (v(∅), v(c), κ) from one batched forward, or (v, v, 1) when the
# combination is trivial (κ ∈ {0, 1}) or the model guides itself (FLUX's guidance embedding)
def guided_velocity_split(model, x_t: Tensor, t: Tensor, cond, uncond, scale: float) -> tuple[Tensor, Tensor, float]:
    """(velocity_uncond, velocity_cond, scale) with u + scale (c − u) equal to `guided_velocity(...)`."""
    from sid_fast.guidance import guided_velocity, guided_velocity_pair

    if getattr(model, "guided_velocity", None) is None and scale not in (0.0, 1.0):
        velocity_uncond, velocity_cond = guided_velocity_pair(model, x_t, t, cond, uncond)
        return velocity_uncond, velocity_cond, scale
    velocity = guided_velocity(model, x_t, t, cond, uncond, scale)
    return velocity, velocity, 1.0


AUTO = "auto"

# kernels.loss_backend=auto: per (device type, dtype of the latents), the backends in the order measured fastest
# for one SiD iteration's use of the two losses (forward + backward of each); the first one available on this
# machine wins. A (device, dtype) missing here runs `torch`. Sources in docs/kernels.md ("auto").
LOSS_AUTO: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("cpu", "float32"): (("cpp", "compile"), "1-thread CPU, fwd+bwd of both ops, benchmarks/results/kernels_cpu_auto.csv "
                                             "(python benchmarks/bench_sid_generator_loss.py --auto)"),
    ("cpu", "bfloat16"): (("cpp", "compile"), "1-thread CPU, fwd+bwd of both ops, benchmarks/results/kernels_cpu_auto.csv "
                                              "(python benchmarks/bench_sid_generator_loss.py --auto)"),
    ("cuda", "float32"): (("compile",), "H200 wall time per synchronised call, benchmarks/results/gpu-h200/"
                                        "kernels_gpu.csv: compile beat eager in every fwd+bwd row; the next GPU run's "
                                        "device times (check_kernels.py) decide between compile, triton and cpp"),
    ("cuda", "bfloat16"): (("compile",), "H200 wall time per synchronised call, benchmarks/results/gpu-h200/"
                                         "kernels_gpu.csv: compile beat eager in every fwd+bwd row; the next GPU run's "
                                         "device times (check_kernels.py) decide between compile, triton and cpp"),
}


def _unavailable(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot run the loss ops on `device_type` here (None when it can)."""
    if backend == "compile":
        return None if device_type in COMPILE_DEVICES else f"compile serves {COMPILE_DEVICES}"
    if backend == "cpp":
        return None if device_type in _cpp_devices() else f"the C++ extension serves {_cpp_devices() or 'no device'}"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None if device_type in _triton_devices() else f"triton runs on {_triton_devices()}"
    return None


def resolve_loss_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """`name` unchanged unless it is `auto`; for `auto`, the fastest measured backend of the loss ops on this
    device type and dtype (`LOSS_AUTO`), else `torch`. Logs one line with the choice and where it came from."""
    if name != AUTO:
        return name
    device_type, dtype_name = torch.device(device).type, str(dtype).replace("torch.", "")
    ranked, source = LOSS_AUTO.get((device_type, dtype_name), ((), ""))
    skipped = []
    for backend in ranked:
        reason = "not registered" if any(backend not in backends(op) for op in LOSS_OPS) else None
        reason = reason or _unavailable(backend, device_type)
        if reason is None:
            log.info("kernels.loss_backend=auto on %s/%s: %s (%s%s)", device_type, dtype_name, backend, source,
                     "".join(f"; {b} skipped: {r}" for b, r in skipped))
            return backend
        skipped.append((backend, reason))
    why = "; ".join(f"{b} skipped: {r}" for b, r in skipped) or (
        f"no measurement for {device_type}/{dtype_name} in sid_fast.kernels.ops.LOSS_AUTO")
    log.info("kernels.loss_backend=auto on %s/%s: torch (%s)", device_type, dtype_name, why)
    return "torch"


_AUTO_RESOLVED: dict[tuple[str, torch.dtype], str] = {}


def _auto_for(tensor: Tensor) -> str:
    key = (tensor.device.type, tensor.dtype)
    if key not in _AUTO_RESOLVED:
        _AUTO_RESOLVED[key] = resolve_loss_backend(AUTO, tensor.device, tensor.dtype)
    return _AUTO_RESOLVED[key]


def check_loss_backend(backend: str) -> None:
    """Raise a ValueError naming `kernels.loss_backend` when no op knows `backend` (`auto` is always accepted)."""
    if backend == AUTO:
        return
    for name in LOSS_OPS:
        if backend not in backends(name):
            raise ValueError(f"config field kernels.loss_backend: op {name} has no backend {backend!r}; "
                             f"registered: {backends(name)} or auto")
