"""Export a distilled generator as a diffusers transformer directory, and sample it in diffusers.

    export_generator(engine.sampling_generator(), "out/sid-sd3", num_steps=4)
writes
    out/sid-sd3/transformer/   config.json + diffusion_pytorch_model.safetensors (loads with from_pretrained)
    out/sid-sd3/scheduler/     SiDScheduler config: the K-step sampler of DESIGN.md §2
    out/sid-sd3/sid_sampler.json   family, K, t_init, noise mode, adapter options

In diffusers, a few lines (the teacher directory supplies text encoders and VAE):
    pipe = load_sid_pipeline("teachers/sd3-medium", "out/sid-sd3")
    image = pipe("a red bicycle", num_inference_steps=4, guidance_scale=1.0).images[0]
`SiDScheduler` plugs into the flow-matching pipelines (StableDiffusion3Pipeline, FluxPipeline, SanaPipeline):
the generator gets no CFG, so call them with guidance_scale=1 (FLUX: guidance embedding 1, §2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from sid_fast.sampler import NOISE_MODES, generator_step_times

SAMPLER_FILE = "sid_sampler.json"


@dataclass
class SiDSchedulerOutput(BaseOutput):
    prev_sample: Tensor
    """The next sampler input x_{t_{k+1}} (or the output D_{K-1} after the last step)."""
    pred_original_sample: Tensor
    """The generator's x0-prediction D_k."""


class SiDScheduler(SchedulerMixin, ConfigMixin):
    """The K-step SiD generator sampler (§2) as a diffusers scheduler.

    Step times t_k = t_init (1 − k/K); timesteps = 1000·t_k. Given the model's velocity v at x_{t_k}:
    D_k = x_{t_k} − t_k v, then x_{t_{k+1}} = (1 − t_{k+1}) D_k + t_{k+1} n_{k+1}; the last step returns D_{K−1}.
    Noise: `fresh` (new draws from `noise_generator` or the step's `generator`), `fixed` (the initial latents z),
    `ddim` (the step's ε-prediction x + (1 − t) v). The pipeline's initial latents are z, so t_init must be 1.
    Sigma schedules and `mu` that pipelines pass are ignored: the step grid is the one the generator was trained on.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, num_steps: int = 4, t_init: float = 1.0, noise: str = "fresh"):
        if noise not in NOISE_MODES:
            raise ValueError(f"SiDScheduler noise must be one of {NOISE_MODES}, got {noise!r}")
        if t_init != 1.0:
            raise ValueError(f"SiDScheduler needs t_init = 1 (pipelines start from pure noise), got {t_init}")
        self.noise_generator: torch.Generator | None = None
        self.set_timesteps(num_steps)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None, **kwargs) -> None:
        steps = num_inference_steps or (len(sigmas) if sigmas is not None else self.config.num_steps)
        times = generator_step_times(int(steps), self.config.t_init)  # §2: t_k = t_init (1 - k/K)
        self.sigmas = torch.tensor(times + [0.0], dtype=torch.float32, device=device)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self.num_inference_steps = len(times)
        self._step_index = 0
        self._z: Tensor | None = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._step_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True, **kwargs):
        index = self._step_index
        if index >= self.num_inference_steps:
            raise IndexError(f"SiDScheduler: step {index} called after the last of {self.num_inference_steps} steps")
        t, t_next = self.sigmas[index].to(sample.device), self.sigmas[index + 1].to(sample.device)
        x_t, velocity = sample.float(), model_output.float()
        if index == 0:
            self._z = x_t
        x0_pred = x_t - t * velocity  # §2: D_k = x_{t_k} - t_k G(x_{t_k})
        if index == self.num_inference_steps - 1:
            prev = x0_pred
        else:
            if self.config.noise == "fresh":
                rng = generator if generator is not None else self.noise_generator
                noise = torch.randn(x_t.shape, generator=rng, device=x_t.device, dtype=x_t.dtype)
            elif self.config.noise == "fixed":
                noise = self._z
            else:
                noise = x_t + (1 - t) * velocity  # ε-prediction (§1)
            prev = (1 - t_next) * x0_pred + t_next * noise  # §2: x_{t_{k+1}}
        self._step_index = index + 1
        prev, x0_pred = prev.to(sample.dtype), x0_pred.to(sample.dtype)
        if not return_dict:
            return (prev, x0_pred)
        return SiDSchedulerOutput(prev_sample=prev, pred_original_sample=x0_pred)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# ---------------------------------------------------------------- export and reload


def _adapter_options(generator: nn.Module) -> dict:
    options = {}
    for name in ("plain_guidance", "timestep_mode", "guidance"):
        if hasattr(generator, name):
            options[name] = getattr(generator, name)
    return options


def export_generator(generator: nn.Module, out_dir: str | Path, num_steps: int = 4, t_init: float = 1.0,
                     noise: str = "fresh") -> Path:
    """Write `generator` (a family adapter: SD3Adapter, FluxAdapter, SanaAdapter) as a diffusers directory."""
    family = getattr(generator, "family", "")
    if not family or not hasattr(generator, "transformer"):
        raise ValueError(f"export_generator needs a diffusers family adapter, got {type(generator).__name__}")
    out_dir = Path(out_dir)
    generator.transformer.save_pretrained(str(out_dir / "transformer"), safe_serialization=True)
    SiDScheduler(num_steps=num_steps, noise=noise, t_init=t_init).save_pretrained(str(out_dir / "scheduler"))
    meta = {"family": family, "num_steps": num_steps, "t_init": t_init, "noise": noise,
            "adapter": _adapter_options(generator)}
    (out_dir / SAMPLER_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def read_sampler_meta(directory: str | Path) -> dict:
    path = Path(directory) / SAMPLER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a directory written by export_generator")
    return json.loads(path.read_text())


def load_generator(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Reload an exported generator as its family adapter (the model protocol), in eval mode."""
    from sid_fast.models.diffusers_family import load_transformer, make_adapter

    meta = read_sampler_meta(directory)
    family = meta["family"]
    adapter = make_adapter(family, load_transformer(directory, family, dtype))
    for name, value in meta["adapter"].items():
        setattr(adapter, name, value)
    return adapter.eval().requires_grad_(False)


def load_sid_pipeline(teacher_dir: str | Path, generator_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The family's diffusers pipeline from `teacher_dir` with the distilled transformer and the SiD scheduler."""
    import diffusers

    from sid_fast.encoders.pipeline_encoder import PIPELINES
    from sid_fast.models.diffusers_family import load_transformer

    meta = read_sampler_meta(generator_dir)
    transformer = load_transformer(generator_dir, meta["family"], dtype)
    scheduler = SiDScheduler.from_pretrained(str(Path(generator_dir) / "scheduler"))
    return getattr(diffusers, PIPELINES[meta["family"]]).from_pretrained(
        str(teacher_dir), transformer=transformer, scheduler=scheduler, dtype=dtype, local_files_only=True)


def export_from_state_dict(teacher_config, generator_file: str | Path, out_dir: str | Path, num_steps: int = 4,
                           t_init: float = 1.0, noise: str = "fresh") -> Path:
    """Turn a run's `generator.safetensors` (adapter state dict) into a diffusers directory, given the run's
    TeacherConfig (the architecture comes from teacher.path or teacher.preset; no prompt encoding)."""
    from safetensors.torch import load_file

    from sid_fast.models import tiny_components
    from sid_fast.models.diffusers_family import DTYPES, load_transformer, make_adapter

    family = teacher_config.kind
    if teacher_config.path is not None:
        transformer = load_transformer(teacher_config.path, family, DTYPES[teacher_config.dtype])
    elif teacher_config.preset is not None:
        transformer = tiny_components.transformer(family, teacher_config.preset)
    else:
        raise ValueError("config field teacher.path: export needs teacher.path or teacher.preset for the architecture")
    adapter = make_adapter(family, transformer, teacher_config)
    state = load_file(str(generator_file))
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{generator_file}: does not fit the {family} teacher; missing {missing[:3]}, unexpected {unexpected[:3]}")
    return export_generator(adapter, out_dir, num_steps, t_init, noise)
