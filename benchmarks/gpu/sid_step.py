"""Full SiD iterations on real-size diffusers DiTs with random weights, timed on one GPU (docs/performance.md).

One iteration = one fake-score update + one generator update (DESIGN.md §2–§4), K = 4 with K' ~ U{1..K} drawn from
the seed: every variant times the same steps, so sees the same K'. κ = 4.5 for all three knobs (FLUX.1-dev: guidance
embedding g = κ plus true CFG, the authors' practice). Variants, same model, same weights (same seed), same batch:

  a   official-style loop written here to the published SiD code's practices (DESIGN.md §7): all three networks
      fp32 under bf16 autocast, TF32 off, diffusers gradient checkpointing in all three, batched [∅, c] CFG, NaN
      samples dropped with a host sync, `.item()` logging every step, nan_to_num on every gradient, torch Adam;
  b   sid_fast's SiDTrainer + LocalEngine, eager, the fast path's switches off: fp32 weights + bf16 autocast,
      per-step checks and scalar reads, single-tensor Adam, SDPA, torch losses; checkpointing in all three as in a;
  c0  sid_fast's fast path without torch.compile: deferred checks, fused Adam, a bf16 frozen teacher, attention and
      loss backends `auto`, activation checkpointing only in the networks memory needs (the trainer's
      engine.checkpoint_networks=auto; all three after an out-of-memory, noted in the row);
  c   c0 + regional torch.compile (the compile happens in extra warm-up iterations);
  d   the DeepSpeed ZeRO-3 engine at world size 1 (bf16), without and with activation checkpointing (d, d+ckpt):
      its losses against b's at the same steps, its peak memory against `sid-fast plan`'s prediction.

Per row: median s/iteration (CUDA events; CPU: perf_counter), images/s (the trainer's count: 2 x batch per
iteration), analytic FLOPs per iteration (sid_fast.models.flops) cross-checked once against FlopCounterMode, MFU
against the card's dense bf16 peak and against the bf16 matmul rate measured first, peak memory, a per-phase
breakdown (one instrumented iteration) and the losses. CSV rows are appended as they are produced.

    python benchmarks/gpu/sid_step.py --section sd35m-1024 --deadline 290        # on the GPU (run.sh)
    python benchmarks/gpu/sid_step.py --section tiny --out /tmp/x                # CPU, tiny models, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------------------------------------------ real configs
# diffusers transformer configs of the released checkpoints (transformer/config.json on the Hugging Face hub; the
# same values as diffusers' conversion scripts). Weights are random: nothing is downloaded.
# stabilityai/stable-diffusion-3.5-medium: 24 joint blocks, 24 heads of 64, dual attention in blocks 0-12
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# stabilityai/stable-diffusion-3.5-large: 38 joint blocks, 38 heads of 64, no dual attention
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                  attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                  dual_attention_layers=(), qk_norm="rms_norm")
# black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks, 24 heads of 128, guidance embedding, rope (16, 56, 56)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# Efficient-Large-Model/Sana_1600M_1024px_diffusers (diffusers scripts/convert_sana_to_diffusers.py,
# SanaMS_1600M_P1_D20): 20 blocks, width 2240 (70 linear-attention heads of 32; 20 cross heads of 112), DC-AE f32c32
SANA_1600M_1024 = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                       num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                       caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
                       norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)
# text (tokens, width, pooled): SD3 CLIP-L+G 77 + T5 256 tokens of 4096, pooled 2048; FLUX T5 512 tokens of 4096,
# CLIP pooled 768; SANA Gemma-2 300 tokens of 2304 with a mask
TEXT = {"sd3": (333, 4096, 2048), "flux": (512, 4096, 768), "sana": (300, 2304, None)}
CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel", "sana": "SanaTransformer2DModel"}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 peak FLOP/s by card (vendor datasheets, no sparsity)."""
ALL = "teacher,fake_score,generator"


@dataclasses.dataclass
class Row:
    name: str
    family: str
    model: str
    resolution: int
    latent: tuple[int, int, int]
    """Unpacked latent (C, h, w): the trainer's sample shape."""
    batch: int
    variants: str
    config: dict | None = None
    """Transformer constructor arguments (None: the tiny preset)."""
    preset: str | None = None
    full_depth: dict | None = None
    """Released depth of a depth-cut model (num_layers, num_single_layers)."""
    depth_note: str = "full depth"
    flux_guidance_mode: str = "embed"
    latent_factor: int = 16
    """Pixels per token (VAE factor x patch) for the memory planner."""
    records: dict = dataclasses.field(default_factory=dict)
    """CSV records of the variants measured so far (the first one fixes the row's batch; d is held against b)."""
    pace: float | None = None
    """Median s/iteration of the last variant measured (predicts whether the next one fits the deadline)."""


def gpu_rows() -> dict[str, Row]:
    """Default micro-batches: the largest that leaves the memory estimate of a and b (all fp32, checkpointed) under
    ~85% of 141 GB, within the run's time budget (docs/performance.md)."""
    flux_cut = dict(FLUX_DEV, num_layers=4, num_single_layers=8)
    large_cut = dict(SD35_LARGE, num_layers=12)
    return {
        "sd35m-1024": Row("sd35m-1024", "sd3", "SD3.5-Medium", 1024, (16, 128, 128), 4, "a,b,c0,c", SD35_MEDIUM),
        "sd35m-512": Row("sd35m-512", "sd3", "SD3.5-Medium", 512, (16, 64, 64), 16, "a,b,c0", SD35_MEDIUM),
        "sana16-1024": Row("sana16-1024", "sana", "SANA-1.6B", 1024, (32, 32, 32), 16, "a,b,c0", SANA_1600M_1024,
                           latent_factor=32),
        "flux-cut-1024": Row("flux-cut-1024", "flux", "FLUX.1-dev", 1024, (16, 128, 128), 2, "a,b,c0", flux_cut,
                             full_depth={"num_layers": 19, "num_single_layers": 38},
                             depth_note="cut to 4/19 double + 8/38 single blocks (3 copies + 2 Adams fit 141 GB)",
                             flux_guidance_mode="embed+cfg"),
        "sd35l-cut-1024": Row("sd35l-cut-1024", "sd3", "SD3.5-Large", 1024, (16, 128, 128), 3, "a,b,c0", large_cut,
                              full_depth={"num_layers": 38},
                              depth_note="cut to 12/38 joint blocks (3 copies + 2 Adams fit 141 GB)"),
        "sd35m-512-zero3": Row("sd35m-512-zero3", "sd3", "SD3.5-Medium", 512, (16, 64, 64), 2, "b,d", SD35_MEDIUM),
    }


def tiny_rows() -> dict[str, Row]:
    common = dict(resolution=32, latent=(16, 8, 8), batch=2, variants="a,b,c0", depth_note="tiny preset", latent_factor=8)
    return {
        "tiny-sd35": Row("tiny-sd35", "sd3", "tiny SD3.5 (sd35-tiny)", preset="sd35-tiny", **common),
        "tiny-flux": Row("tiny-flux", "flux", "tiny FLUX.1-dev (tiny)", preset="tiny", flux_guidance_mode="embed+cfg",
                         **common),
        "tiny-sana": Row("tiny-sana", "sana", "tiny SANA (tiny)", preset="tiny", **{**common, "latent": (8, 8, 8)}),
    }


SECTIONS = {"sd35m-1024": ["sd35m-1024"], "others": ["sd35m-512", "sana16-1024", "flux-cut-1024", "sd35l-cut-1024"],
            "zero3": ["sd35m-512-zero3"], "compiled": ["sd35m-512", "sana16-1024", "flux-cut-1024", "sd35l-cut-1024"],
            "tiny": ["tiny-sd35", "tiny-flux", "tiny-sana"]}
SECTION_VARIANTS = {"others": "c0,b,a", "compiled": "c"}
VARIANT_MAJOR = {"others", "compiled"}
"""Sections that run one variant over all their rows before the next variant: under a deadline every family gets
its fast-path row first."""

# ------------------------------------------------------------------------------------------------ variants
# switches by config field; fields this checkout does not have are dropped (and named in the row's notes)
COMMON = {"train.progress": False, "train.resume": False, "train.log_every": 10, "health.tensorboard": False,
          "method.num_steps": 4, "method.random_steps": True}
FAST = {"health.defer_checks": True, "optim.implementation": "fused", "teacher.dtype": "float32",
        "teacher.frozen_dtype": "bfloat16", "train.autocast": "bfloat16", "kernels.attention": "auto",
        "kernels.loss_backend": "auto"}
VARIANTS = {
    "b": {"kernels.compile": False, "health.defer_checks": False, "optim.implementation": "single",
          "teacher.dtype": "float32", "teacher.frozen_dtype": "", "train.autocast": "bfloat16",
          "kernels.attention": "native", "kernels.loss_backend": "torch", "engine.activation_checkpointing": True,
          "engine.checkpoint_networks": ALL},
    "c0": {**FAST, "kernels.compile": False},
    "c": {**FAST, "kernels.compile": True, "kernels.compile_mode": "default"},
    "d": {"engine.kind": "deepspeed", "engine.bf16": True, "engine.optimizer": "torch", "teacher.dtype": "float32",
          "teacher.frozen_dtype": "", "train.autocast": "off", "health.defer_checks": False, "kernels.compile": False,
          "kernels.attention": "native", "kernels.loss_backend": "torch", "engine.checkpoint_networks": ALL},
}
FALLBACKS = {"kernels.loss_backend": "torch", "kernels.attention": "native", "kernels.compile_backend": "inductor",
             "optim.implementation": "auto"}
"""A switch value this checkout cannot honour yet goes back to this, and the row's notes say so."""
FIELDS = ["section", "row", "variant", "model", "resolution", "depth_note", "batch", "status", "n_timed",
          "s_per_it_median", "s_per_it_all", "images_per_s", "tflop_per_it_analytic", "flopcounter_ratio",
          "flopcounter_expected_ratio", "mfu_peak", "mfu_measured", "peak_mem_gib", "reserved_mem_gib", "warmup_s",
          "tflop_fwd_per_sample", "per_block_tflop_per_sample", "full_depth_tflop_per_it", "full_depth_s_per_it_est",
          "plan", "phases", "losses", "settings", "notes", "matmul_tflops", "device", "torch", "git_sha", "date"]


def k_prime(seed: int, step: int, num_steps: int = 4) -> int:
    """K' of iteration `step`: the trainer's own draw (SiDTrainer.steps_for_iteration)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(1, num_steps + 1, (1,), generator=g)) if num_steps > 1 else 1


def sig(value: float | None, digits: int = 4) -> float | None:
    """`value` to `digits` significant digits (tiny CPU rows have TFLOP counts far under 1e-3)."""
    return None if value is None else float(f"{value:.{digits}g}")


# ------------------------------------------------------------------------------------------------ timing


class Clock:
    """Marks on the device timeline (CUDA events) or the host clock (CPU), read after one synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Timeline:
    """Partitions one iteration into labelled segments: `switch(label)` closes the open segment and opens `label`."""

    def __init__(self, clock: Clock):
        self.clock, self.state, self.marks = clock, "glue", [("start", clock.mark())]

    def switch(self, label: str) -> None:
        self.marks.append((self.state, self.clock.mark()))
        self.state = label

    def totals_ms(self) -> dict[str, float]:
        self.switch("end")
        self.clock.sync()
        out: dict[str, float] = {}
        for (_, start), (label, end) in zip(self.marks, self.marks[1:]):
            out[label] = out.get(label, 0.0) + 1e3 * self.clock.seconds(start, end)
        return {k: sig(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


class _Mark(torch.autograd.Function):
    """Identity whose backward calls `callback` (when the gradient reaches this point)."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


def instrument(networks: dict, timeline: Timeline) -> list:
    """Hooks on the diffusers transformer inside each network: a forward opens its phase, and marks in the autograd
    graph open the backward phases (the gradient reaches a network's output: its backward starts; its input: it
    ends). Phases: gen_sample (no-grad generator calls), gen_fwd/gen_bwd (its last call), fake_fwd/bwd_fakestep,
    teacher_fwd + teacher_input_bwd, fake_fwd_genstep + fake_input_bwd, optim, glue (draws, CFG combine, losses,
    checks) and bwd_glue. Returns the hook handles."""
    handles = []
    for name, network in networks.items():
        module = getattr(network, "transformer", network)

        def pre(mod, args, kwargs, name=name):
            grad = torch.is_grad_enabled()
            trainable = next(mod.parameters()).requires_grad
            if name == "generator":
                label, bwd = ("gen_fwd", "gen_bwd") if grad else ("gen_sample", None)
            elif name == "fake_score":
                label, bwd = ("fake_fwd_fakestep", "fake_bwd_fakestep") if trainable else ("fake_fwd_genstep", "fake_input_bwd")
            else:
                label, bwd = "teacher_fwd", "teacher_input_bwd"
            timeline.switch(label)
            mod._sid_step_bwd = bwd if grad else None
            key = "hidden_states" if "hidden_states" in kwargs else None
            x = kwargs[key] if key else args[0]
            if grad and x.requires_grad:
                x = _Mark.apply(x, lambda: timeline.switch("bwd_glue"))
                kwargs, args = ({**kwargs, key: x}, args) if key else (kwargs, (x, *args[1:]))
            return args, kwargs

        def post(mod, args, kwargs, output):
            timeline.switch("glue")
            label = getattr(mod, "_sid_step_bwd", None)
            first = output[0] if isinstance(output, tuple) else output.sample
            if label is None or not first.requires_grad:
                return output
            first = _Mark.apply(first, lambda label=label: timeline.switch(label))
            return (first, *output[1:]) if isinstance(output, tuple) else type(output)(sample=first)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    return handles


def measure_matmul(device: torch.device) -> float:
    """bf16 matrix-product rate (FLOP/s) on random data: the practical ceiling the MFU is also held against."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    clock, times = Clock(device), []
    for _ in range(3):
        a @ b
    clock.sync()
    for _ in range(10):
        start = clock.mark()
        a @ b
        end = clock.mark()
        clock.sync()
        times.append(clock.seconds(start, end))
    return 2 * n**3 / statistics.median(times)


# ------------------------------------------------------------------------------------------------ models


def build_transformer(row: Row, device: torch.device, seed: int):
    """The row's diffusers transformer, random fp32 weights seeded by `seed`, initialised on `device`."""
    import diffusers

    from sid_fast.models import tiny_components

    if row.preset is not None:
        return tiny_components.seeded(lambda: tiny_components.transformer(row.family, row.preset), seed).to(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, CLASSES[row.family])(**row.config)
    return model.to(device).eval()


def teacher_config(row: Row):
    from sid_fast.config import TeacherConfig

    return TeacherConfig(kind=row.family, flux_guidance_mode=row.flux_guidance_mode, flux_guidance=3.5)


def text_shape(row: Row) -> tuple[int, int, int | None]:
    """(tokens, width, pooled width or None) of the family's text conditioning."""
    if row.preset is not None:
        from sid_fast.models.tiny_components import preset_spec

        spec = preset_spec(row.family, row.preset)
        return spec["seq"], spec["text"], (spec["text"] if row.family != "sana" else None)
    return TEXT[row.family]


def make_conditions(row: Row, device: torch.device, seed: int, prompts: int = 16):
    """Random prompt embeddings of the family's shapes held on the device: an EmbeddingConditions whose draws index
    there (no host sync per draw: the trainer is measured, not a data path)."""
    from sid_fast.encoders import EmbeddingConditions
    from sid_fast.models.protocol import Conditioning

    class DeviceEmbeddings(EmbeddingConditions):
        def sample(self, batch_size, generator):
            index = torch.randint(len(self.bank), (batch_size,), generator=generator, device=generator.device)
            return self.bank.map(lambda value: value.index_select(0, index.to(value.device)))

    tokens, width, pooled = text_shape(row)
    g = torch.Generator().manual_seed(seed + 1)

    def bank(n):
        fields = {"embeds": torch.randn(n, tokens, width, generator=g)}
        if pooled is not None:
            fields["pooled"] = torch.randn(n, pooled, generator=g)
        if row.family == "sana":
            fields["mask"] = torch.ones(n, tokens, dtype=torch.int64)
        return Conditioning(**fields).to(device)

    return DeviceEmbeddings(bank(prompts), bank(1))


def cfg_passes(row: Row, transformer, kappa: float = 4.5) -> int:
    from sid_fast.models.flops import cfg_passes as passes

    if row.family == "flux" and transformer.config.guidance_embeds:
        return passes(kappa, true_cfg=row.flux_guidance_mode == "embed+cfg")
    return passes(kappa)


def forward_flops(row: Row, transformer):
    """Forward FLOPs of one call at the row's micro-batch (sid_fast.models.flops)."""
    from sid_fast.models.flops import dit_forward_flops, image_tokens

    config = transformer.config
    return dit_forward_flops(config, row.batch, image_tokens(config, row.latent[1], row.latent[2]), text_shape(row)[0])


# ------------------------------------------------------------------------------------------------ configs


def build_config(overrides: dict, notes: list[str]):
    """A SiDConfig from dotted overrides; fields this checkout lacks are dropped and named in `notes`."""
    from sid_fast.config import SiDConfig, from_dict, merge, to_dict

    base = to_dict(SiDConfig())
    nested: dict = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if section not in base or name not in base[section]:
            if f"{key} absent in this checkout" not in notes:
                notes.append(f"{key} absent in this checkout")
            continue
        nested.setdefault(section, {})[name] = value
    return from_dict(SiDConfig, merge(base, nested))


def variant_overrides(row: Row, variant: str, device: torch.device, args, checkpointed: str) -> dict:
    settings = {**COMMON, **VARIANTS[variant], "train.batch_size": row.batch, "train.seed": args.seed,
                "train.device": str(device), "train.out_dir": str(Path(tempfile.gettempdir()) / "sid_step_runs" / f"{row.name}-{variant}"),
                "teacher.kind": row.family, "teacher.flux_guidance_mode": row.flux_guidance_mode}
    if variant in ("c0", "c", "d"):
        settings["engine.activation_checkpointing"] = bool(checkpointed)
        if checkpointed:
            settings["engine.checkpoint_networks"] = checkpointed
    if variant == "c":
        settings.update({"kernels.compile_backend": args.compile_backend, "kernels.compile_mode": args.compile_mode})
    if variant == "d" and device.type == "cpu":
        settings["engine.bf16"] = False  # DeepSpeed's CPU accelerator: fp32 (the CPU test checks the plumbing only)
    return settings


# ------------------------------------------------------------------------------------------------ loops


class OfficialLoop:
    """Variant a: the published SiD code's practices (module docstring), the same method and draws as the trainer."""

    def __init__(self, row: Row, transformer, conditions, device: torch.device, config):
        from sid_fast.models.diffusers_family import make_adapter

        self.row, self.conditions, self.device, self.config = row, conditions, device, config
        self.teacher = make_adapter(row.family, transformer, teacher_config(row))
        self.fake_score = copy.deepcopy(self.teacher)
        self.generator = copy.deepcopy(self.teacher)
        for network in (self.teacher, self.fake_score, self.generator):
            network.transformer.enable_gradient_checkpointing()
        self.teacher.eval().requires_grad_(False)
        self.fake_score.train().requires_grad_(True)
        self.generator.train().requires_grad_(True)
        optim = config.optim
        self.optimizers = {name: torch.optim.Adam(getattr(self, name).parameters(), lr=lr, betas=(0.0, 0.999),
                                                  eps=optim.eps)
                           for name, lr in (("fake_score", optim.lr_fake), ("generator", optim.lr_generator))}
        self.rng = torch.Generator(device=device).manual_seed(config.train.seed)
        self.step, self.timeline = 0, None
        self.log: list[tuple[int, int, float, float]] = []

    def _switch(self, label: str) -> None:
        if self.timeline is not None:
            self.timeline.switch(label)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _draws(self, steps_run: int, grad: bool):
        from sid_fast.flow import interpolate, sample_time
        from sid_fast.sampler import few_step_sample

        method, batch = self.config.method, self.row.batch
        cond = self.conditions.sample(batch, self.rng)
        uncond = self.conditions.unconditional(batch)
        z = torch.randn((batch, *self.row.latent), generator=self.rng, device=self.device)
        with self._autocast(), torch.set_grad_enabled(grad):
            x_g = few_step_sample(self.generator, z, cond, method.num_steps, steps_to_run=steps_run,
                                  t_init=method.t_init, noise=method.noise, rng=self.rng, grad_last=grad)
        keep = torch.isfinite(x_g.detach()).flatten(1).all(dim=1)
        if not bool(keep.all()):  # the authors drop NaN samples: a host sync every step
            x_g, cond, uncond = x_g[keep], cond[keep], uncond[keep]
        tc = method.time
        noise = torch.randn(x_g.shape, generator=self.rng, device=self.device)
        t = sample_time(x_g.shape[0], tc.scheme, mean=tc.mean, std=tc.std, shift=tc.shift, t_min=tc.t_min,
                        t_max=tc.t_max, generator=self.rng, device=self.device)
        return cond, uncond, x_g, noise, t, interpolate(x_g, noise, t)

    def _update(self, name: str, loss) -> float:
        self._switch("bwd_glue")
        optimizer = self.optimizers[name]
        optimizer.zero_grad()
        loss.backward()
        self._switch("optim")
        for p in getattr(self, name).parameters():  # gradients passed through nan_to_num (§7)
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        optimizer.step()
        self._switch("glue")
        return loss.item()  # logged every step: a host sync

    def train_step(self) -> int:
        from sid_fast.guidance import guided_velocity
        from sid_fast.losses import fake_score_loss, loss_weight, sid_generator_loss

        method, step = self.config.method, self.step
        steps_run = k_prime(self.config.train.seed, step, method.num_steps)
        cond, uncond, x_g, noise, t, x_t = self._draws(steps_run, grad=False)
        with self._autocast():
            velocity = guided_velocity(self.fake_score, x_t, t, cond, uncond, method.kappa_fake_loss)
        loss_fake = self._update("fake_score", fake_score_loss(velocity.float(), x_g, noise).mean())
        cond, uncond, x_g, noise, t, x_t = self._draws(steps_run, grad=True)
        self.fake_score.requires_grad_(False)  # input gradients only, until its recomputed blocks are done
        with self._autocast():
            velocity_teacher = guided_velocity(self.teacher, x_t, t, cond, uncond, method.kappa_teacher)
            velocity_fake = guided_velocity(self.fake_score, x_t, t, cond, uncond, method.kappa_fake_gen)
        weight = loss_weight(method.weighting, t)
        loss = sid_generator_loss(x_t, t, x_g, velocity_teacher.float(), velocity_fake.float(), weight, method.alpha,
                                  method.loss_scale).mean()
        loss_generator = self._update("generator", loss)
        self.fake_score.requires_grad_(True)
        self.step += 1
        self.log.append((step, steps_run, loss_fake, loss_generator))
        return steps_run

    def networks(self) -> dict:
        return {"teacher": self.teacher, "fake_score": self.fake_score, "generator": self.generator}

    def losses(self) -> list[tuple[int, int, float, float]]:
        return self.log


class TrainerLoop:
    """Variants b, c0, c, d: sid_fast's SiDTrainer over the engine `build_engine` makes from the config, stepped
    as `fit` steps it (deferred checks: scalars stay on the device, guard flushed every train.log_every)."""

    def __init__(self, row: Row, transformer, conditions, config, notes: list[str]):
        from sid_fast.engine.build import build_engine
        from sid_fast.models.diffusers_family import make_adapter
        from sid_fast.models.registry import TeacherBundle
        from sid_fast.trainer import SiDTrainer

        self.config, self.timeline, self.records, self._restore = config, None, [], []
        teacher = make_adapter(row.family, transformer, config.teacher)
        self.engine = build_engine(config, TeacherBundle(teacher, None, conditions, tuple(row.latent)))
        self.trainer = SiDTrainer(config, self.engine, conditions, tuple(row.latent))
        self.deferred = bool(getattr(config.health, "defer_checks", False)) and hasattr(self.trainer, "_train_step")
        self.own_autocast = config.train.autocast != "off" and not hasattr(self.trainer, "_autocast")
        if self.own_autocast:
            notes.append("train.autocast not applied by this trainer: the benchmark wraps the step in autocast")
        # the networks the engine checkpoints (engine.checkpoint_networks resolved, `auto` included); an older engine
        # without the attribute: the networks the config names
        self.checkpointed = getattr(self.engine, "checkpointed", None)
        if self.checkpointed is None:
            self.checkpointed = tuple(n.strip() for n in config.engine.checkpoint_networks.split(",") if n.strip()) \
                if config.engine.activation_checkpointing else ()
        local = config.engine.kind == "local"
        for name in self.checkpointed:  # an engine that ignores the switch: apply it here and say so
            module = getattr(self.engine, name).transformer
            if local and not getattr(module, "gradient_checkpointing", False):
                module.enable_gradient_checkpointing()
                notes.append(f"checkpointing of the {name} applied by the benchmark (the engine ignored it)")
        if local and "fake_score" in self.checkpointed and not hasattr(self.engine, "_frozen_until_backward"):
            # the fake score's blocks are recomputed inside the generator's backward, so it must stay frozen until
            # then (DeepSpeedEngine does so); restoring requires_grad on leaving `frozen` makes the recomputation
            # differ from the forward (torch.utils.checkpoint.CheckpointError)
            self.engine.frozen = self._frozen_until_backward
            notes.append("LocalEngine.frozen patched by the benchmark: the fake score stays frozen until the backward "
                         "(checkpointed recomputation fails otherwise)")
        backward, step = self.engine.backward, self.engine.step

        def wrapped_backward(name, loss):
            self._switch("bwd_glue")
            backward(name, loss)
            for flags in self._restore:
                for p, flag in flags:
                    p.requires_grad_(flag)
            self._restore.clear()
            self._switch("glue")

        def wrapped_step(name):
            self._switch("optim")
            out = step(name)
            self._switch("glue")
            return out

        self.engine.backward, self.engine.step = wrapped_backward, wrapped_step

    def _switch(self, label: str) -> None:
        if self.timeline is not None:
            self.timeline.switch(label)

    @contextlib.contextmanager
    def _frozen_until_backward(self, name: str):
        flags = [(p, p.requires_grad) for p in getattr(self.engine, name).parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        yield
        self._restore.append(flags)

    @property
    def step(self) -> int:
        return self.trainer.step

    @step.setter
    def step(self, value: int) -> None:
        self.trainer.step = value

    def train_step(self) -> int:
        step = self.trainer.step
        autocast = torch.autocast(self.engine.device.type, dtype=torch.bfloat16) if self.own_autocast \
            else contextlib.nullcontext()
        with autocast:
            if self.deferred:
                stats = self.trainer._train_step()
                if self.trainer.step % self.config.train.log_every == 0:
                    self.trainer.guard.flush()
            else:
                stats = self.trainer.train_step()
        self.records.append((step, stats))
        return stats.steps_run

    def losses(self) -> list[tuple[int, int, float, float]]:
        def value(x):
            return float(x) if x is not None else float("nan")

        if self.deferred:
            self.trainer.guard.flush()
        return [(step, s.steps_run, value(s.loss_fake), value(s.loss_generator)) for step, s in self.records]

    def networks(self) -> dict:
        return {"teacher": self.engine.teacher, "fake_score": self.engine.fake_score, "generator": self.engine.generator}

    def close(self) -> None:
        """DeepSpeed keeps its engines (and through them the networks) reachable until they are destroyed."""
        engines = getattr(self.engine, "engines", None) or {}
        for ds_engine in engines.values():
            if ds_engine is not None and hasattr(ds_engine, "destroy"):
                ds_engine.destroy()
        offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
        if engines and offload is not None and hasattr(offload, "FWD_MODULE_STACK"):
            offload.FWD_MODULE_STACK.clear()  # a global list that keeps every ZeRO-3 top module (and its engine)


# ------------------------------------------------------------------------------------------------ one variant


def build_loop(row: Row, variant: str, args, device: torch.device, checkpointed: str, notes: list[str],
               forced: dict | None = None):
    """(loop, settings, checkpointed networks) for `variant`; a switch value the checkout cannot honour falls back
    (FALLBACKS, or `forced` after a failed first run) and is named in `notes`."""
    conditions = make_conditions(row, device, args.seed)
    if variant == "a":
        config = build_config({**COMMON, "train.seed": args.seed, "train.batch_size": row.batch}, notes)
        loop = OfficialLoop(row, build_transformer(row, device, args.seed), conditions, device, config)
        settings = {"weights": "fp32 x3", "autocast": "bfloat16", "tf32": False, "adam": "torch default (foreach)",
                    "nan_drop_sync": True, "item_logging": True, "nan_to_num_grads": True}
        return loop, settings, ALL
    overrides = {**variant_overrides(row, variant, device, args, checkpointed), **(forced or {})}
    for key, value in (forced or {}).items():
        notes.append(f"{key} forced to {value} after a failed run")
    for _ in range(len(FALLBACKS) + 1):
        config = build_config(overrides, notes)
        try:
            loop = TrainerLoop(row, build_transformer(row, device, args.seed), conditions, config, notes)
            break
        except ValueError as error:
            field = next((f for f in FALLBACKS if f in str(error) and overrides.get(f) != FALLBACKS[f]), None)
            if field is None:
                raise
            overrides[field] = FALLBACKS[field]
            notes.append(f"{field} fell back to {FALLBACKS[field]}: {str(error)[:140]}")
    settings = {k: v for k, v in overrides.items() if k not in COMMON and k != "train.out_dir"}
    return loop, settings, ",".join(loop.checkpointed)


def set_tf32(matmul: bool, cudnn: bool) -> tuple[bool, bool] | None:
    """TF32 of matrix products and convolutions; returns the previous setting (None: this torch refused the legacy
    switches, e.g. after torch's newer `fp32_precision` API was used, and nothing changed)."""
    try:
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        return before
    except (RuntimeError, AttributeError) as error:
        print(f"TF32 switches unavailable ({error}); variant a keeps torch's setting", flush=True)
        return None


def run_variant(row: Row, variant: str, args, device: torch.device, ctx: dict, checkpointed: str = "",
                forced: dict | None = None) -> dict:
    """Build, warm up, time, instrument (b: count FLOPs once) one variant; returns its CSV row."""
    from sid_fast.models.flops import counted_iteration_flops, flop_counter_mode, sid_iteration_flops

    notes: list[str] = []
    clock = Clock(device)
    tf32 = set_tf32(False, False) if variant == "a" else None  # the authors' code disables TF32
    try:
        loop, settings, checkpointed = build_loop(row, variant, args, device, checkpointed, notes, forced)
        forward = forward_flops(row, loop.networks()["teacher"].transformer)
        passes = cfg_passes(row, loop.networks()["teacher"].transformer)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps: list[tuple[int, int]] = []

        def iterate():
            step = loop.step
            steps.append((step, loop.train_step()))

        started = time.perf_counter()
        for _ in range(args.warmup + (args.compile_warmup if variant == "c" else 0)):
            iterate()
        loop.step = args.warmup  # every variant times the same steps (same K'): compiled warm-ups rejoin here
        clock.sync()
        warmup_s = time.perf_counter() - started
        times = []
        for i in range(args.iters):
            start = clock.mark()
            iterate()
            times.append((start, clock.mark()))
            if i >= 1 and time.monotonic() > ctx["deadline"] - args.reserve:
                notes.append(f"stopped after {i + 1} timed iterations: deadline")
                break
        clock.sync()
        seconds = [clock.seconds(s, e) for s, e in times]
        timed = steps[-len(seconds):]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
        wrong = [(s, k) for s, k in steps if k != k_prime(args.seed, s)]
        if wrong:
            notes.append(f"K' differs from the seeded draw at steps {wrong[:3]}")
        analytic = [sid_iteration_flops(forward.total, forward.total, forward.total, k, passes, passes, passes)["total"]
                    for _, k in timed]
        phases = {}
        if not args.skip_phases and time.monotonic() < ctx["deadline"] - args.reserve:
            timeline = Timeline(clock)
            handles = instrument(loop.networks(), timeline)
            loop.timeline = timeline
            try:
                iterate()
                phases = timeline.totals_ms()
            finally:
                loop.timeline = None
                for handle in handles:
                    handle.remove()
        ratio = expected = None
        if variant == "b" and not args.skip_flopcount and time.monotonic() < ctx["deadline"] - args.reserve:
            k = k_prime(args.seed, loop.step)
            with flop_counter_mode() as counter:
                iterate()
            rules = sid_iteration_flops(forward.total, forward.total, forward.total, k, passes, passes, passes)["total"]
            model = counted_iteration_flops(forward, forward, forward, k, passes, passes, passes,
                                            set(filter(None, checkpointed.split(","))))["total"]
            ratio, expected = counter.get_total_flops() / rules, model / rules
        while variant == "d" and len(steps) < 5:  # d's losses are held against b's over 5 iterations
            iterate()
        record = summarize(row, seconds, analytic, forward, peak, reserved, ctx)
        with contextlib.suppress(RuntimeError, AttributeError):
            settings["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        record.update(variant=variant, warmup_s=sig(warmup_s), phases=json.dumps(phases),
                      losses=json.dumps([[s, k, sig(f, 7), sig(g, 7)] for s, k, f, g in loop.losses()]),
                      settings=json.dumps({**settings, "checkpointed": checkpointed}))
        if ratio is not None:
            record.update(flopcounter_ratio=sig(ratio), flopcounter_expected_ratio=sig(expected))
        if variant == "d":
            planned = plan_for(row, loop, bool(checkpointed), device)
            record["plan"] = json.dumps(planned)
            if peak is not None:
                notes.append(f"sid-fast plan: {planned['total']} GiB (activations {planned['activations']}, "
                             f"overhead {planned['overhead']}) vs measured peak {peak:.1f} GiB allocated, "
                             f"{reserved:.1f} reserved")
        record["notes"] = "; ".join(notes)
        return record
    finally:
        if tf32 is not None:
            set_tf32(*tf32)
        if hasattr(locals().get("loop"), "close"):
            loop.close()


def summarize(row: Row, seconds: list[float], analytic: list[float], forward, peak, reserved, ctx) -> dict:
    median = statistics.median(seconds) if seconds else None
    record = {"row": row.name, "model": row.model, "resolution": row.resolution, "depth_note": row.depth_note,
              "batch": row.batch, "status": "ok", "n_timed": len(seconds), "s_per_it_median": sig(median),
              "s_per_it_all": json.dumps([sig(s) for s in seconds]),
              "images_per_s": sig(2 * row.batch / median) if median else None,
              "tflop_per_it_analytic": sig(statistics.mean(analytic) / 1e12) if analytic else None,
              "tflop_fwd_per_sample": sig(forward.total / forward.batch / 1e12),
              "per_block_tflop_per_sample": json.dumps({k: sig(forward.per_block(k) / forward.batch / 1e12)
                                                        for k in forward.blocks}),
              "peak_mem_gib": sig(peak), "reserved_mem_gib": sig(reserved), "matmul_tflops": sig(ctx["matmul"] / 1e12)}
    if seconds:
        rate = sum(analytic) / sum(seconds)  # MFU over the timed iterations' own K' (not the median's)
        record["mfu_measured"] = sig(rate / ctx["matmul"])
        if ctx["peak"]:
            record["mfu_peak"] = sig(rate / ctx["peak"])
    if row.full_depth and analytic:  # per-block figures scaled to the released depth (same MFU assumed)
        if row.family == "flux":
            counts = {"double": row.full_depth["num_layers"], "single": row.full_depth["num_single_layers"]}
        else:
            layers = row.full_depth["num_layers"]
            dual = len([i for i in row.config.get("dual_attention_layers", ()) if i < layers - 1])
            counts = {"joint": layers - 1 - dual, "joint_last": 1, "joint_dual": dual}
        counts = {kind: n for kind, n in counts.items() if n}
        if set(counts) <= set(forward.blocks):  # every block kind of the released model is in the cut one
            scale = forward.at_depth({**dict.fromkeys(forward.blocks, 0), **counts}).total / forward.total
            record["full_depth_tflop_per_it"] = sig(statistics.mean(analytic) * scale / 1e12)
            record["full_depth_s_per_it_est"] = sig(median * scale) if median else None
    return record


def plan_for(row: Row, loop, checkpointing: bool, device: torch.device) -> dict:
    """`sid-fast plan`'s prediction (GiB) for this config on one GPU at this batch, to set beside the measured peak."""
    from sid_fast.engine.planner import GIB, PlanOptions, plan, spec_from_module

    module = loop.engine.teacher.transformer
    config = module.config
    width = config.num_attention_heads * config.attention_head_dim
    gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 0.0
    spec = spec_from_module(module, row.model, width, config.num_layers + config.get("num_single_layers", 0),
                            text_shape(row)[0], row.latent_factor)
    full = [p.ds_numel for p in module.parameters() if hasattr(p, "ds_numel")]
    if full:  # ZeRO-3 parameters: their full sizes
        spec = dataclasses.replace(spec, params=float(sum(full)))
    result = plan(spec, PlanOptions(resolution=row.resolution, micro_batch=row.batch, gpus_per_node=1, nodes=1,
                                    gpu_gib=gib, activation_checkpointing=checkpointing,
                                    cfg=cfg_passes(row, module) == 2, precision="bf16"))
    return {k: sig(result[k] / GIB) for k in ("teacher_params", "fake_score_states", "generator_states",
                                              "activations", "overhead", "total")}


def loss_check(reference: dict, record: dict, tolerance: float) -> str:
    """d's losses against b's at the same steps: the fake-score loss (large, well conditioned) relative, the
    generator loss (a near-zero difference of teacher and fake predictions at the start) against b's spread."""
    ref = {s: (f, g) for s, _, f, g in json.loads(reference["losses"])}
    got = [(s, f, g) for s, _, f, g in json.loads(record["losses"]) if s in ref][:5]
    if not got:
        return "no common steps with b"
    fake = max(abs(f - ref[s][0]) / max(abs(ref[s][0]), 1e-12) for s, f, _ in got)
    gen = max(abs(g - ref[s][1]) for s, _, g in got)
    spread = statistics.pstdev([ref[s][1] for s, _, _ in got]) if len(got) > 1 else float("nan")
    verdict = "within" if fake <= tolerance else "OUTSIDE"
    return (f"losses of {len(got)} iterations vs b: fake-score max relative difference {fake:.3g} ({verdict} "
            f"tolerance {tolerance}); generator max |difference| {gen:.3g} (b's own spread {spread:.3g})")


# ------------------------------------------------------------------------------------------------ main


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else os.environ.get("SID_FAST_GIT_SHA", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SID_FAST_GIT_SHA", "unknown")


def append_row(path: Path, record: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(record)
        handle.flush()
        os.fsync(handle.fileno())


def table(path: Path, sections: set[str] | None = None) -> str:
    """The short table printed last: one line per CSV row (of `sections`, default all)."""
    if not path.exists():
        return f"(no {path})"
    lines = [f"{'row':<16} {'var':<6} {'batch':>5} {'s/it':>8} {'img/s':>8} {'TFLOP/it':>9} {'MFUpeak':>7} "
             f"{'MFUmm':>6} {'peakGiB':>7} {'warm s':>6} {'flops':>5}  status / notes"]
    with open(path) as handle:
        for r in csv.DictReader(handle):
            if sections and r["section"] not in sections:
                continue

            def cell(key, width, fmt="{:.3g}", r=r):
                value = r.get(key) or ""
                try:
                    return f"{fmt.format(float(value)):>{width}}"
                except ValueError:
                    return f"{value[:width]:>{width}}"

            status = r["status"] if r["status"] != "ok" else (r.get("notes") or "ok")
            lines.append(f"{r['row']:<16} {r['variant']:<6} {r['batch']:>5} {cell('s_per_it_median', 8)} "
                         f"{cell('images_per_s', 8)} {cell('tflop_per_it_analytic', 9)} "
                         f"{cell('mfu_peak', 7, '{:.1%}')} {cell('mfu_measured', 6, '{:.0%}')} "
                         f"{cell('peak_mem_gib', 7)} {cell('warmup_s', 6, '{:.0f}')} {cell('flopcounter_ratio', 5)}  "
                         f"{status[:70]}")
    return "\n".join(lines)


def attempt(function, *args) -> tuple[dict | None, str | None, bool]:
    """(record, error line, out of memory) of `function(*args)`; the exception and its frames are gone on return,
    so the memory of a failed build is free again."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t)
    try:
        return function(*args), None, False
    except Exception as error:  # OOM, no deepspeed, ...: one line, a CSV row, and on
        line = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        if os.environ.get("SID_STEP_TRACEBACK"):
            traceback.print_exc()
        return None, line, isinstance(error, oom_types)


def free_memory() -> None:
    """Between variants: compiled graphs (they keep the last variant's modules alive), garbage, the CUDA cache."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def predict_seconds(row: Row, variant: str, args, ctx: dict, pace: float | None) -> float:
    """Rough wall time of an eager variant: a build and its iterations at the row's last measured pace, or at 35%
    of the measured matmul rate (analytic FLOPs at K' = 2.5, the mean of U{1..4})."""
    from sid_fast.models.flops import sid_iteration_flops

    iterations = args.warmup + args.iters + 1 + (1 if variant == "b" else 0) + (4 if variant == "d" else 0)
    if pace is None:
        transformer = build_transformer(row, torch.device("meta"), 0)
        f, passes = forward_flops(row, transformer).total, cfg_passes(row, transformer)
        pace = sid_iteration_flops(f, f, f, 2.5, passes, passes, passes)["total"] / (0.35 * ctx["matmul"])
    build = (20.0 if ctx.get("cuda") else 2.0) * (2 if variant == "d" else 1)  # d: DeepSpeed's init too
    return build + iterations * pace


def quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Mm]ismatch dtype.*")
    for name in ("diffusers", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()


def run_child(row: Row, key: str, args, ctx: dict) -> tuple[dict | None, str | None, bool]:
    """One DeepSpeed job in a fresh process: ZeRO-3 keeps its engines reachable from hooks that torch holds in C++,
    so their memory outlives them in this process (d and d+ckpt together would not fit the card)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--job", key, "--section", args.section_name, "--rows", row.name,
                   "--batch", str(row.batch), "--out", out, "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--seed", str(args.seed), "--reserve", str(args.reserve), "--loss-tolerance", str(args.loss_tolerance),
                   "--deadline", str(max(ctx["deadline"] - time.monotonic(), 1.0))]
        command += ["--device", args.device] if args.device else []
        command += ["--skip-phases"] if args.skip_phases else []
        done = subprocess.run(command, cwd=ROOT)
        path = Path(out) / "sid_step.csv"
        rows = list(csv.DictReader(open(path))) if path.exists() else []
    if not rows:
        return None, f"the {key} process exited with {done.returncode} and wrote no row", False
    record = {k: v for k, v in rows[-1].items() if k in FIELDS}
    if record["status"] != "ok":
        return None, record["status"].removeprefix("failed: "), "OutOfMemoryError" in record["status"]
    record["s_per_it_median"] = float(record["s_per_it_median"]) if record["s_per_it_median"] else None
    return record, None, False


def run_row(row: Row, variants: list[str], args, device: torch.device, ctx: dict, common: dict, csv_path: Path) -> int:
    """All variants of one row (d: without and with checkpointing, each in its own process unless this is that
    process); returns the number of failed variants."""
    failures, records = 0, row.records
    jobs = [job for v in variants for job in ([("d", "d", ""), ("d+ckpt", "d", ALL)] if v == "d" else [(v, v, "")])]
    if args.job:
        jobs = [job for job in jobs if job[0] == args.job] or [(args.job, args.job[0], ALL if "ckpt" in args.job else "")]
    for key, variant, checkpointed in jobs:
        left = ctx["deadline"] - args.reserve - time.monotonic()
        need = 60.0 if variant == "c" else predict_seconds(row, variant, args, ctx, row.pace)  # c: compile time unknown
        if left < need:
            print(f"{row.name} {key}: skipped (deadline: ~{need:.0f} s needed, {left:.0f} s left)", flush=True)
            append_row(csv_path, {**common, "row": row.name, "variant": key, "model": row.model, "batch": row.batch,
                                  "status": f"skipped: deadline (~{need:.0f} s needed, {left:.0f} s left)"})
            continue
        started = time.monotonic()
        if variant in ("c0", "c") and not checkpointed:
            checkpointed = "auto"  # the trainer's choice (engine.checkpoint_networks=auto, sid_fast.engine.planner)
        if variant == "d" and not args.job:
            record, error, oom = run_child(row, key, args, ctx)
        else:
            record, error, oom = attempt(run_variant, row, variant, args, device, ctx, checkpointed)
        free_memory()
        if oom and variant in ("c0", "c") and checkpointed != ALL:  # the planner's estimate was short
            print(f"{row.name} {key}: out of memory with checkpointing '{checkpointed}'; again with all three", flush=True)
            record, error, oom = attempt(run_variant, row, variant, args, device, ctx, ALL)
            free_memory()
            if record is not None:
                record["notes"] = "; ".join(filter(None, [
                    f"out of memory with engine.checkpoint_networks={checkpointed} (its choice: the [engine] line "
                    "printed before): the planner underestimates; timed with all three checkpointed", record["notes"]]))
        if error and not oom and "no backend 'auto'" in error:  # accepted by the config, not yet by an op
            field = "kernels.loss_backend" if "_loss" in error else "kernels.attention"
            record, error, oom = attempt(run_variant, row, variant, args, device, ctx, checkpointed,
                                         {field: FALLBACKS[field]})
            free_memory()
        if oom and not records and row.batch > 1:  # the first variant of a row sets the batch for all of them
            row.batch //= 2
            print(f"{row.name} {key}: out of memory; the row goes on at batch {row.batch}", flush=True)
            record, error, oom = attempt(run_variant, row, variant, args, device, ctx, checkpointed)
            free_memory()
        if record is None:
            failures += 1
            print(f"{row.name} {key}: FAILED {error}", flush=True)
            append_row(csv_path, {**common, "row": row.name, "variant": key, "model": row.model, "batch": row.batch,
                                  "status": f"failed: {error}"})
            continue
        record["variant"] = key
        row.pace = record["s_per_it_median"] or row.pace
        if key.startswith("d") and "b" in records:
            record["notes"] = "; ".join(filter(None, [record["notes"], loss_check(records["b"], record,
                                                                                   args.loss_tolerance)]))
        records[key] = record
        append_row(csv_path, {**common, **record})
        print(f"{row.name} {key}: {record['s_per_it_median']} s/it, {record['images_per_s']} img/s, "
              f"MFU(peak) {record.get('mfu_peak') or '-'}, peak {record.get('peak_mem_gib') or '-'} GiB, "
              f"{time.monotonic() - started:.0f} s wall" + (" (own process)" if variant == "d" else ""), flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", default=None, help=f"one of {sorted(SECTIONS)} (default sd35m-1024; --tiny: tiny)")
    parser.add_argument("--rows", default=None, help="comma-separated rows (instead of the section's)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of a,b,c0,c,d (default: per row)")
    parser.add_argument("--batch", default=None, help="micro-batch for every row (N), or per row (row=N,row=N)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up iterations of every variant")
    parser.add_argument("--compile-warmup", type=int, default=1, help="extra warm-up iterations of c (compile)")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds from start; later work is skipped")
    parser.add_argument("--reserve", type=float, default=15.0, help="seconds kept free before the deadline")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu-h200"))
    parser.add_argument("--tiny", action="store_true", help="the tiny rows on the CPU (the test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-backend", default="inductor", help="kernels.compile_backend of c")
    parser.add_argument("--compile-mode", default="default", help="kernels.compile_mode of c")
    parser.add_argument("--skip-phases", action="store_true")
    parser.add_argument("--skip-flopcount", action="store_true")
    parser.add_argument("--loss-tolerance", type=float, default=0.05, help="d vs b: relative, fake-score loss")
    parser.add_argument("--table", action="store_true", help="print the table of the CSV in --out and exit")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # one DeepSpeed job (d, d+ckpt) of run_child
    args = parser.parse_args()
    started = time.monotonic()
    quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "sid_step.csv"
    if args.table:
        print(table(csv_path))
        return 0
    section = args.section or ("tiny" if args.tiny else "sd35m-1024")
    args.section_name = section
    tiny = args.tiny or section == "tiny"
    rows = tiny_rows() if tiny else gpu_rows()
    names = args.rows.split(",") if args.rows else SECTIONS[section]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    batches = {}
    for item in filter(None, (args.batch or "").split(",")):
        name, _, value = item.rpartition("=")
        batches[name or "*"] = int(value)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ctx = {"deadline": started + args.deadline, "matmul": measure_matmul(device), "cuda": device.type == "cuda",
           "peak": next((v for k, v in PEAK_BF16.items() if k in card), None)}
    common = {"section": section, "device": card, "torch": torch.__version__, "git_sha": git_sha(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    print(f"{card}: bf16 matmul {ctx['matmul'] / 1e12:.1f} TFLOP/s measured"
          + (f", datasheet dense bf16 peak {ctx['peak'] / 1e12:.0f}" if ctx["peak"] else ""), flush=True)
    failures, plan = 0, []
    for name in names:
        row = rows[name]
        row.batch = batches.get(name, batches.get("*", row.batch))
        plan.append((row, (args.variants or SECTION_VARIANTS.get(section) or row.variants).split(",")))
    if section in VARIANT_MAJOR:  # variant by variant over the rows
        order = list(dict.fromkeys(v for _, variants in plan for v in variants))
        plan = [(row, [v]) for v in order for row, variants in plan if v in variants]
    for row, variants in plan:
        failures += run_row(row, variants, args, device, ctx, common, csv_path)
    if not args.job:
        print("\n" + table(csv_path, {section}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
