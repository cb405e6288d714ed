"""The `cpp` backend: csrc/sid_losses.cpp (OpenMP via ATen's parallel_for), and csrc/sid_losses_cuda.cu on a
CUDA build, compiled with `torch.utils.cpp_extension.load` on first use (about a minute on 2 cores, then cached
under $SID_FAST_EXT_DIR or ~/.cache/sid_fast/torch_extensions). Optional: when the build fails the registry
falls back to the reference and logs why."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("sid_fast.kernels")

_SOURCES = ("sid_losses.cpp",)
_CUDA_SOURCES = ("sid_losses_cuda.cu",)
_STATE: dict[str, object] = {}


def source_dir() -> Path:
    """csrc/ of a source checkout, else the copy installed beside this module."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / _SOURCES[0]).exists():
            return candidate
    raise FileNotFoundError(f"csrc/{_SOURCES[0]} not found next to {here}")


def load(with_cuda: bool | None = None) -> None:
    """Build (once) and load the extension; raises with the compiler's message when it cannot be built."""
    if _STATE.get("loaded"):
        return
    from torch.utils.cpp_extension import CUDA_HOME
    from torch.utils.cpp_extension import load as load_extension

    with_cuda = torch.cuda.is_available() and CUDA_HOME is not None if with_cuda is None else with_cuda
    sources = [str(source_dir() / s) for s in _SOURCES + (_CUDA_SOURCES if with_cuda else ())]
    build_dir = Path(os.environ.get("SID_FAST_EXT_DIR", Path.home() / ".cache" / "sid_fast" / "torch_extensions"))
    build_dir = build_dir / ("sid_losses_cuda" if with_cuda else "sid_losses_cpu")
    build_dir.mkdir(parents=True, exist_ok=True)
    load_extension("sid_fast_losses_cuda" if with_cuda else "sid_fast_losses", sources, build_directory=str(build_dir),
                   extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"],
                   with_cuda=with_cuda, is_python_module=False, verbose=False)
    _STATE["loaded"] = True
    _STATE["cuda"] = with_cuda


@torch.compiler.assume_constant_result  # evaluated once while tracing: torch.compile sees a constant
def devices() -> tuple[str, ...]:
    """Devices the extension serves; () when it cannot be built (the reason is logged once)."""
    if "devices" not in _STATE:
        try:
            load()
            _STATE["devices"] = ("cpu", "cuda") if _STATE["cuda"] else ("cpu",)
        except (RuntimeError, OSError, ImportError, FileNotFoundError) as error:  # optional backend: log, fall back
            log.warning("sid_fast C++ extension unavailable, backend 'cpp' falls back to torch: %s", error)
            _STATE["devices"] = ()
    return _STATE["devices"]


def _common(tensors: list[Tensor]) -> list[Tensor]:
    dtype = tensors[0].dtype if all(v.dtype == tensors[0].dtype for v in tensors) else torch.float32
    return [v.to(dtype).contiguous() for v in tensors]


def generator_forward(x_t, t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond, teacher_scale, fake_scale,
                      weight, alpha=1.0, scale=100.0) -> Tensor:
    """§3 generator loss per sample (B,) fp32 (same contract as the reference)."""
    load()
    latents = _common([x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond])
    per_sample_sum = torch.ops.sid_fast_cpp.generator_forward(*latents, t.float().contiguous(), teacher_scale,
                                                              fake_scale, alpha)
    return scale * weight.float() * per_sample_sum


def generator_backward(grad, x_t, t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond, teacher_scale,
                       fake_scale, weight, alpha=1.0, scale=100.0) -> tuple[Tensor, ...]:
    """Gradients for (x_t, t, x_g, u_r, c_r, u_f, c_f, weight), each in its input's dtype."""
    load()
    inputs = [x_t, x_g, teacher_uncond, teacher_cond, fake_uncond, fake_cond]
    grad = grad.float()
    coef = (grad * scale * weight.float()).contiguous()
    *latent_grads, g_t, per_sample_sum = torch.ops.sid_fast_cpp.generator_backward(
        *_common(inputs), t.float().contiguous(), coef, teacher_scale, fake_scale, alpha)
    g_x_t, g_x_g, g_tu, g_tc, g_fu, g_fc = (g.to(v.dtype) for g, v in zip(latent_grads, inputs))
    return g_x_t, g_t.to(t.dtype), g_x_g, g_tu, g_tc, g_fu, g_fc, (grad * scale * per_sample_sum).to(weight.dtype)


def fake_forward(velocity_uncond, velocity_cond, scale, x_g, noise) -> Tensor:
    """§3 fake-score loss per sample (B,) fp32."""
    load()
    return torch.ops.sid_fast_cpp.fake_forward(*_common([velocity_uncond, velocity_cond, x_g, noise]), scale)


def fake_backward(grad, velocity_uncond, velocity_cond, scale, x_g, noise) -> tuple[Tensor, ...]:
    """Gradients for (velocity_uncond, velocity_cond, x_g, noise), each in its input's dtype."""
    load()
    inputs = [velocity_uncond, velocity_cond, x_g, noise]
    grads = torch.ops.sid_fast_cpp.fake_backward(*_common(inputs), grad.float().contiguous(), scale)
    return tuple(g.to(v.dtype) for g, v in zip(grads, inputs))
