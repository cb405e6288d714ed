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

from sid_fast.errors import ConfigError
from sid_fast.flow import TIME_SCHEMES
from sid_fast.losses import WEIGHTINGS
from sid_fast.sampler import NOISE_MODES


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config field {name}: {message}")


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
    resolution: int = 0
    """Image size in pixels of the diffusers teachers (latent side = resolution / VAE factor); 0: the teacher's default."""
    prompts: str | None = None
    """Text file of training prompts, one per line, encoded once by the teacher's own text encoders (sd3/flux/sana)."""
    max_sequence_length: int = 0
    """T5/Gemma prompt tokens; 0: the pipeline's default (SD3 256, FLUX 512, SANA 300)."""
    flux_guidance_mode: str = "embed"
    """FLUX.1-dev guidance of teacher and fake score (§4): `embed` (g = flux_guidance) or `embed+cfg` (g = κ and CFG at κ)."""
    flux_guidance: float = 3.5
    """FLUX guidance-embedding value g of the `embed` mode (the FLUX.1-dev pipeline default)."""
    sana_timestep: str = "auto"
    """SANA timestep convention: `1000t` (RF teachers), `t` (SANA-Sprint teachers) or `auto` (from the model config)."""
    fake_lora_rank: int = 0
    """Fake score as teacher + LoRA adapters of this rank (teacher weights shared); 0: a full trainable copy."""
    frozen_dtype: str = ""
    """Weight dtype of the frozen teacher: '' (= teacher.dtype), float32, bfloat16 or float16. It never trains, so
    bfloat16 here holds it in bf16 with no fp32 master copy (the fast path on GPUs)."""

    def __post_init__(self) -> None:
        _check(bool(self.kind), "teacher.kind", "must name a teacher family")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "teacher.dtype", f"unknown dtype {self.dtype!r}")
        _check(self.frozen_dtype in ("", "float32", "bfloat16", "float16"), "teacher.frozen_dtype",
               f"unknown dtype {self.frozen_dtype!r}; expected '', float32, bfloat16 or float16")
        _check(self.resolution >= 0, "teacher.resolution", f"must be >= 0, got {self.resolution}")
        _check(self.max_sequence_length >= 0, "teacher.max_sequence_length", "must be >= 0")
        _check(self.flux_guidance_mode in ("embed", "embed+cfg"), "teacher.flux_guidance_mode",
               f"must be `embed` or `embed+cfg`, got {self.flux_guidance_mode!r}")
        _check(self.flux_guidance > 0, "teacher.flux_guidance", f"must be > 0, got {self.flux_guidance}")
        _check(self.sana_timestep in ("auto", "1000t", "t"), "teacher.sana_timestep",
               f"must be auto, 1000t or t, got {self.sana_timestep!r}")
        _check(self.fake_lora_rank >= 0, "teacher.fake_lora_rank", f"must be >= 0, got {self.fake_lora_rank}")
        if self.prompts is not None:
            _check(Path(self.prompts).is_file(), "teacher.prompts", f"prompt file {self.prompts!r} does not exist")
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
    implementation: str = "auto"
    """Adam of the local engine: `fused` (one kernel for all parameters, CUDA), `foreach` (multi-tensor ops),
    `single` (a loop over parameters) or `auto` (fused on CUDA, single elsewhere: torch's CPU default)."""

    def __post_init__(self) -> None:
        for name in ("lr_generator", "lr_fake"):
            _check(getattr(self, name) > 0, f"optim.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _check(self.eps > 0, "optim.eps", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")
        _check(self.implementation in ("auto", "fused", "foreach", "single"), "optim.implementation",
               f"must be auto, fused, foreach or single, got {self.implementation!r}")


@dataclass
class TrainConfig:
    iterations: int = 1000
    """Number of SiD iterations (one fake-score update then one generator update each)."""
    batch_size: int = 256
    """Micro-batch per process and update."""
    grad_accum: int = 1
    """Micro-batches accumulated per update of each network."""
    fake_updates: int = 1
    """Fake-score updates per iteration before the generator update (1 in the paper; more lets the fake score keep up)."""
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
    autocast: str = "off"
    """Autocast of the networks' forwards: off, bfloat16 or float16 (weights keep their dtype; losses stay fp32)."""

    def images_per_iteration(self, world_size: int = 1) -> int:
        """Images one iteration adds to the trainer's images_seen: every fake-score update and the generator update,
        each of grad_accum micro-batches, on every rank (what eval.every_images and the SiD²ₐ warm-ups count)."""
        return (self.fake_updates + 1) * self.grad_accum * self.batch_size * world_size

    def __post_init__(self) -> None:
        _check(self.iterations >= 0, "train.iterations", "must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.fake_updates >= 1, "train.fake_updates", f"must be >= 1, got {self.fake_updates}")
        _check(self.fake_warmup_iters >= 0, "train.fake_warmup_iters", "must be >= 0")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.autocast in ("off", "bfloat16", "float16"), "train.autocast",
               f"must be off, bfloat16 or float16, got {self.autocast!r}")


@dataclass
class EngineConfig:
    kind: str = "local"
    """How the three networks are held: `local` (one process) or `deepspeed` (ZeRO-3 over all ranks)."""
    zero_stage: int = 3
    """ZeRO stage of the DeepSpeed engine (3: parameters, gradients and optimizer states partitioned)."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 master weights and Adam states in the optimizer."""
    offload_optimizer: bool = False
    """Keep fp32 master weights and Adam states in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameter partitions in CPU memory between uses (ZeRO-Infinity, CPU)."""
    pin_memory: bool = True
    """Pin the CPU buffers of offloading."""
    activation_checkpointing: bool = False
    """Recompute transformer-block activations in backward (models with `enable_gradient_checkpointing`)."""
    checkpoint_networks: str = "teacher,fake_score,generator"
    """With activation_checkpointing: the networks whose blocks are recomputed (comma-separated; all three keep
    activations for a backward: the teacher and the fake score for their input gradients in the generator step),
    or `auto`: only where memory needs it, the planner's estimate of this run's activations against
    engine.memory_gib (sid_fast.engine.build.resolve_checkpointed)."""
    memory_gib: float = 0.0
    """Memory per device that checkpoint_networks=auto plans for; 0: the CUDA device's total (on the CPU, 0 means
    no limit: nothing is checkpointed)."""
    ds_config: str | None = None
    """Optional DeepSpeed JSON whose DeepSpeed-only keys are merged over the generated config."""
    optimizer: str = "auto"
    """Adam implementation: `torch` (torch.optim.Adam), `deepspeed` (FusedAdam / CPU Adam) or `auto`."""
    persistence_threshold: int = 100_000
    """Parameters with fewer elements stay whole on every rank (ZeRO-3 persistence); 0 partitions all."""
    overlap_comm: bool = False
    """Overlap gradient reduce-scatter with backward (GPU only)."""
    sharded_ema: bool = True
    """Keep the generator EMA as each rank's own partition (no all-gather per step); False: full copy per rank."""
    backend: str | None = None
    """torch.distributed backend; default nccl on GPUs, gloo on CPU."""

    def __post_init__(self) -> None:
        _check(self.kind in ("local", "deepspeed"), "engine.kind", f"unknown engine {self.kind!r}; expected local or deepspeed")
        _check(self.zero_stage == 3, "engine.zero_stage", f"only ZeRO stage 3 is supported, got {self.zero_stage}")
        _check(self.optimizer in ("auto", "torch", "deepspeed"), "engine.optimizer",
               f"unknown optimizer {self.optimizer!r}; expected auto, torch or deepspeed")
        _check(self.persistence_threshold >= 0, "engine.persistence_threshold", "must be >= 0")
        names = [n.strip() for n in self.checkpoint_networks.split(",") if n.strip()]
        unknown = sorted(set(names) - {"teacher", "fake_score", "generator"}) if names != ["auto"] else []
        _check(not unknown, "engine.checkpoint_networks",
               f"unknown network(s) {unknown}; expected auto or a comma-separated subset of teacher,fake_score,generator")
        _check(self.memory_gib >= 0, "engine.memory_gib", f"must be >= 0, got {self.memory_gib}")
        _check(self.backend in (None, "nccl", "gloo", "mpi", "ccl", "hccl"), "engine.backend", f"unknown backend {self.backend!r}")
        if self.ds_config is not None:
            _check(Path(self.ds_config).is_file(), "engine.ds_config", f"DeepSpeed JSON {self.ds_config!r} does not exist")


@dataclass
class DataConfig:
    shards: str | None = None
    """Directory of prepared shards (`sid-fast prepare`); None: conditions come from the teacher family."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process)."""
    shuffle_buffer: int = 1000
    """Records held by each reader's shuffle buffer (0: shard order only)."""
    max_bad_fraction: float = 0.01
    """Stop with an error naming the shard when a reader's bad samples in an epoch exceed this fraction."""
    seed: int | None = None
    """Seed of the shard order and shuffle (None: train.seed)."""

    def __post_init__(self) -> None:
        if self.shards is not None:
            _check(Path(self.shards, "manifest.json").is_file(), "data.shards",
                   f"{self.shards!r} is not a finished shard directory (no manifest.json)")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _check(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class KernelConfig:
    loss_backend: str = "torch"
    """Backend of the fused SiD loss ops (`sid_fast.kernels`): torch (the reference), compile (torch.compile of it),
    triton, cpp, a registered one, or auto (the fastest measured for the device and dtype; docs/kernels.md)."""
    attention: str = "auto"
    """Attention of diffusers networks: auto (flash-attn 3/2, then xformers, on CUDA; else SDPA), native, flash, flash_3 or xformers."""
    block_backend: str = "torch"
    """DiT block kernels of diffusers networks (adaLN modulation, RMSNorm, FLUX rotary): torch (nothing installed) or triton."""
    compile: bool = False
    """Regional torch.compile: the repeated DiT blocks of the three networks compiled (one graph per block variant
    shared by all instances), the rest eager; a model with no repeated blocks stays eager."""
    compile_mode: str = "default"
    """torch.compile mode of kernels.compile: default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs."""
    compile_backend: str = "inductor"
    """torch.compile backend of kernels.compile: inductor, or aot_eager / eager to debug (no code generation)."""

    def __post_init__(self) -> None:
        _check(bool(self.loss_backend) and self.loss_backend.isidentifier(), "kernels.loss_backend",
               f"must name a backend (torch, triton, cpp, ...), got {self.loss_backend!r}")
        _check(self.attention in ("auto", "native", "flash", "flash_3", "xformers"), "kernels.attention",
               f"unknown attention backend {self.attention!r}; expected auto, native, flash, flash_3 or xformers")
        _check(bool(self.block_backend) and self.block_backend.isidentifier(), "kernels.block_backend",
               f"must name a backend (torch, triton, ...), got {self.block_backend!r}")
        _check(self.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
               "kernels.compile_mode", f"unknown torch.compile mode {self.compile_mode!r}")


@dataclass
class AdversarialConfig:
    enabled: bool = False
    """Data-aided SiD²ₐ (§5): real latents + captions from image shards, the fake score as discriminator."""
    generator_warmup_images: int = 20_000
    """No generator updates until this many images have been seen (fake score + discriminator only)."""
    adversarial_from_images: int = 40_000
    """The generator's adversarial term starts at this many images seen (before: L_θ alone)."""
    sid_weight: float = 0.5
    """Weight of L_θ in the generator total once the adversarial term is on (0.5·L_θ + 0.5·L_adv)."""
    adv_weight: float = 0.5
    """Weight of L_adv in the generator total."""
    weighting: str = "one_minus_t"
    """λ(t) of L_adv (any §3 weighting but `sid`)."""
    init_generator: str | None = None
    """Generator start: a data-free run's generator.safetensors or a checkpoint step directory (§5); None: teacher copy.
    Also honoured with adversarial.enabled=false: continued data-free SiD from that start (SiD²ₐ's control)."""

    def __post_init__(self) -> None:
        _check(self.generator_warmup_images >= 0, "adversarial.generator_warmup_images", "must be >= 0")
        _check(self.adversarial_from_images >= 0, "adversarial.adversarial_from_images", "must be >= 0")
        _check(self.sid_weight >= 0 and self.adv_weight >= 0, "adversarial.sid_weight/adv_weight", "must be >= 0")
        _check(self.weighting in WEIGHTINGS and self.weighting != "sid", "adversarial.weighting",
               f"must be one of {[w for w in WEIGHTINGS if w != 'sid']}, got {self.weighting!r}")
        if self.init_generator is not None:
            _check(Path(self.init_generator).exists(), "adversarial.init_generator",
                   f"{self.init_generator!r} does not exist")


@dataclass
class HealthConfig:
    on_nonfinite: str = "stop"
    """NaN/inf in a watched tensor or loss: `stop` (raise, naming step, network, tensor) or `skip` (drop that update)."""
    check_tensors: bool = True
    """Check network outputs (teacher, fake score, generator) for NaN/inf, not only the losses."""
    defer_checks: bool = True
    """Keep the NaN/inf flags and the logged scalars on the device and read them every train.log_every iterations
    (and before every checkpoint and evaluation): no host sync per step. False reads them after every update.
    on_nonfinite=skip always reads them per update (it must decide before the optimizer step)."""
    collapse_every: int = 0
    """Iterations between diversity checks of a fixed-seed generator batch (0: off)."""
    collapse_batch: int = 16
    """Samples in the fixed-seed diversity batch."""
    collapse_ratio: float = 0.5
    """Warn when the mean pairwise distance falls below this fraction of its first value."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU (e.g. 989 for H100 bf16 dense); 0: MFU not reported."""
    tensorboard: bool = True
    """Write TensorBoard scalars under out_dir/tb (rank 0)."""
    wandb_project: str | None = None
    """Weights & Biases project; used only when `wandb` is importable."""

    def __post_init__(self) -> None:
        _check(self.on_nonfinite in ("stop", "skip"), "health.on_nonfinite", f"must be stop or skip, got {self.on_nonfinite!r}")
        _check(self.collapse_every >= 0, "health.collapse_every", "must be >= 0")
        _check(self.collapse_batch >= 2, "health.collapse_batch", "must be >= 2")
        _check(0 < self.collapse_ratio < 1, "health.collapse_ratio", "must be in (0, 1)")
        _check(self.peak_tflops >= 0, "health.peak_tflops", "must be >= 0")


@dataclass
class EvalConfig:
    every_images: int = 0
    """Evaluate every this many images seen (0: off)."""
    num_samples: int = 64
    """Samples per evaluation (fixed prompts and seeds), split evenly over ranks."""
    seed: int = 1234
    """Seed of the evaluation noise and prompt choice."""
    grid: int = 16
    """Samples shown in the PNG grid (rank 0's first ones)."""
    metric: str = "fd"
    """Metric that picks the best checkpoints: fd (Fréchet distance on pooled samples), fid, clip or shapes (checker)."""
    keep_best: int = 2
    """Best-by-metric generator checkpoints kept under out_dir/best (never fewer than 1)."""
    inception_weights: str | None = None
    """Local Inception-v3 weights for FID (TorchScript, or a state dict with torch-fidelity installed)."""
    clip_model: str | None = None
    """Local CLIP model directory (transformers format) for the CLIP score."""
    reference: str | None = None
    """safetensors with reference `features` (N, F) or `mu`/`sigma` for the Fréchet metrics (fd, fid)."""
    shapes_features: str | None = None
    """ShapesWorld feature-net weights for the `shapes` metric's Fréchet distance (None: the shipped file if present)."""

    def __post_init__(self) -> None:
        _check(self.every_images >= 0, "eval.every_images", "must be >= 0")
        _check(self.num_samples >= 2, "eval.num_samples", "must be >= 2")
        _check(self.grid >= 0, "eval.grid", "must be >= 0")
        _check(self.metric in ("fd", "fid", "clip", "shapes"), "eval.metric",
               f"must be fd, fid, clip or shapes, got {self.metric!r}")
        _check(self.keep_best >= 1, "eval.keep_best", "must be >= 1 (the only checkpoint is never deleted)")
        if self.every_images > 0:  # the files a metric cannot run without, named before any work is done
            needs = {"fid": ("inception_weights", "reference"), "clip": ("clip_model",)}.get(self.metric, ())
            for name in needs:
                _check(getattr(self, name) is not None, f"eval.{name}",
                       f"eval.metric={self.metric} needs it (a local file; nothing is downloaded; see docs/evaluation.md)")
        for name in ("inception_weights", "clip_model", "reference", "shapes_features"):
            value = getattr(self, name)
            if value is not None:
                _check(Path(value).exists(), f"eval.{name}", f"{value!r} does not exist")


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
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Single process or DeepSpeed ZeRO-3 (see docs/distributed.md)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt/image shards and the streaming loader (see docs/data.md)."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """Fused loss kernels and the attention backend (see docs/kernels.md)."""
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    """Data-aided SiD²ₐ (§5; see docs/evaluation.md)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """NaN/inf handling, collapse warning, MFU and log sinks (see docs/evaluation.md)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """In-loop evaluation and best-checkpoint keeping (see docs/evaluation.md)."""


# ---------------------------------------------------------------- dict / YAML / overrides


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _coerce(value, annotation, name: str):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) < len(typing.get_args(annotation)):
            return None
        raise ConfigError(f"config field {name}: may not be null")
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
        raise ConfigError(f"config field {name}: expected a boolean, got {value!r}")
    if annotation in (int, float, str):
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config field {name}: expected an integer, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field {name}: expected {annotation.__name__}, got {value!r}") from None
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown config field(s) {sorted(prefix + u for u in unknown)}; known: {sorted(known)}")
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
            raise ConfigError(f"override {item!r} must look like section.field=value")
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
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        data = merge(data, loaded)
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def dump_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
