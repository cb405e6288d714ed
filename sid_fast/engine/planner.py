"""Memory planner for SiD under ZeRO-3: per-GPU bytes of parameters, gradients, optimizer states and activations.

Model states follow DeepSpeed's own ZeRO-3 estimator (`estimate_zero3_model_states_mem_needs`): a trainable
network costs 18 bytes per parameter over all GPUs (bf16 weight 2 + bf16 gradient 2 + fp32 master, Adam m and
v 12 + 2 of fp32 gradient-partition slack) plus 4 bytes per parameter of the largest layer (gathered and
prefetched); with the optimizer offloaded only the 2-byte partitions stay on the GPU. The frozen teacher holds
only its bf16 partitions (2 bytes). A LoRA fake score (`lora_fake_rank` r > 0) shares the teacher's partitioned
base (one copy serves both, as the DeepSpeed engine holds it) and costs only its adapters' states: r·Σ(d_in + d_out)
parameters over the adapted attention projections (`ModelSpec.lora_per_rank`, counted from the diffusers modules),
18 bytes each like any trainable parameter; its activations are those of a full fake score (it runs the whole
network). In fp32 (`precision`) a trainable parameter costs 4 + 4 (gradient) + 4 (fp32 master, a separate copy as
DeepSpeed keeps it) + 8 (Adam) = 20 bytes: what a CPU run measures (tests/test_engine_zero3.py).

Activations (DESIGN §3): the generator step backpropagates through the generator's last call (1 pass of the
micro-batch) and, as input gradients, through teacher and fake score with CFG (2 passes each when κ ∉ {0, 1}):
5 stored passes; the fake-score step stores 2. A transformer block stores about 34·S·h bytes per sample in bf16
with fused attention (Korthikanti et al. 2022, without the a·S² term); with activation checkpointing only the
block input 2·S·h per block is kept, plus one block being recomputed. Numbers are estimates: see
docs/distributed.md for how they compare with DeepSpeed's estimator and measured runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GIB = 1024**3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: float
    """Transformer parameters."""
    largest_layer: float
    """Parameters of the largest single module (what ZeRO-3 gathers at once)."""
    hidden: int
    blocks: int
    """Transformer blocks (FLUX: 19 double + 38 single)."""
    text_tokens: int
    """Text tokens in the joint sequence (0 when text enters by cross-attention only)."""
    latent_factor: int
    """Pixels per latent cell (VAE factor × patch size): tokens = (resolution / factor)²."""
    lora_per_rank: float = 0.0
    """LoRA parameters per unit of rank of the fake score's adapters: Σ (d_in + d_out) over the linear layers
    `make_lora_fake_score` adapts (to_q, to_k, to_v, to_out.0 of every attention); 0: estimated as 8·hidden per block."""
    buffers: float = 0.0
    """Elements of floating-point buffers (SD3's positional-embedding table): not parameters, so ZeRO-3 does not
    partition them; every rank holds them whole, once per network tree (a LoRA fake score shares the teacher's)."""


# Public configs of the diffusers transformers. Parameters, largest layer, buffers and lora_per_rank are counted on
# the diffusers model built from the public config on the meta device (tests/test_engine_planner.py checks them);
# lora_per_rank with sid_fast.models.lora.lora_params_per_rank (SD3: 24 joint attentions; SD3.5-Medium: 24 + 13
# dual; SD3.5-Large: 38; FLUX: 19 double-stream attentions with to_out + 38 single-stream without; SANA: 20 self- +
# 20 cross-attentions). SD3's buffer is its positional-embedding table, (pos_embed_max_size)² × hidden.
MODELS = {
    "sana-1.6b": ModelSpec("SANA 1.6B", 1.6045e9, 30.12e6, 2240, 20, 0, 32, lora_per_rank=716_800),
    "sd3-medium": ModelSpec("SD3-Medium", 2.0283e9, 14.16e6, 1536, 24, 333, 16, lora_per_rank=294_912,
                            buffers=56.62e6),
    "sd35-medium": ModelSpec("SD3.5-Medium", 2.2432e9, 21.25e6, 1536, 24, 333, 16, lora_per_rank=454_656,
                             buffers=226.49e6),
    "sd35-large": ModelSpec("SD3.5-Large", 8.0566e9, 35.50e6, 2432, 38, 333, 16, lora_per_rank=739_328,
                            buffers=89.65e6),
    "flux-dev": ModelSpec("FLUX.1-dev", 11.9014e9, 56.64e6, 3072, 57, 512, 16, lora_per_rank=1_167_360),
}


@dataclass
class PlanOptions:
    resolution: int = 1024
    micro_batch: int = 1
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_gib: float = 80.0
    offload_optimizer: bool = False
    activation_checkpointing: bool = False
    lora_fake_rank: int = 0
    """0: full fake-score copy; r > 0: LoRA of rank r on the teacher's weights."""
    cfg: bool = True
    """CFG passes (κ ∉ {0, 1}) double the teacher and fake-score batches."""
    precision: str = "bf16"
    """bf16 (fp32 master weights in the optimizer) or fp32."""
    overhead_gib: float = 3.0
    """CUDA context, NCCL buffers, allocator fragmentation."""
    ema: bool = False
    """An EMA of the generator (train.ema_decay > 0): an fp32 copy, partitioned like the weights (engine.sharded_ema)."""


def zero3_model_state_bytes(params: float, largest_layer: float, gpus: int, nodes: int, offload: bool) -> float:
    """Per-GPU bytes of a trainable network's ZeRO-3 model states (DeepSpeed's estimator, no CPU offload of params)."""
    largest = 4 * largest_layer
    return largest + (2 * params / gpus if offload else 18 * params / gpus)


def deepspeed_estimate(params: float, largest_layer: float, gpus_per_node: int, nodes: int, offload: bool) -> float:
    """The same quantity from DeepSpeed's own function (for checking this planner against it)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(int(params), int(largest_layer), gpus_per_node, nodes,
                                                           cpu_offload=offload, cpu_offload_params=False, zero_init=True)
    return float(gpu_mem)


def lora_params(spec: ModelSpec, rank: int) -> float:
    """Parameters of the LoRA fake score's adapters: rank · Σ (d_in + d_out) over the adapted projections."""
    per_rank = spec.lora_per_rank or 8 * spec.hidden * spec.blocks  # fallback: q, k, v, out of one attention per block
    return rank * per_rank


def trainable_state_parts(params: float, gpus: int, precision: str = "bf16", offload: bool = False) -> dict[str, float]:
    """Per-GPU bytes of a trainable network's ZeRO-3 partitions by kind (without the gathered-layer term).

    bf16: weights 2 + gradients 2 + fp32 master 4 + Adam 8 + 2 more = DeepSpeed's 18 bytes per parameter; fp32:
    4 + 4 + 4 + 8 = 20 (DeepSpeed keeps a separate fp32 master partition); optimizer offloaded: only the weights."""
    weight = 2 if precision == "bf16" else 4
    per = {"weights": weight, "gradients": 0, "master": 0, "optimizer": 0, "other": 0}
    if not offload:
        per.update(gradients=weight, master=4, optimizer=8, other=2 if precision == "bf16" else 0)
    return {kind: size * params / gpus for kind, size in per.items()}


def ema_bytes(params: float, gpus: int = 1, sharded: bool = True) -> float:
    """Per-GPU bytes of the generator's fp32 EMA (sid_fast.engine.base.EMA, ShardedEMA): 4 per parameter, a 1/gpus
    partition of it when sharded (engine.sharded_ema)."""
    return 4 * params / (gpus if sharded else 1)


def plan(spec: ModelSpec, options: PlanOptions) -> dict:
    """Per-GPU memory (bytes) by part and the verdict for `options`."""
    gpus = options.gpus_per_node * options.nodes
    weight_bytes = 2 if options.precision == "bf16" else 4
    teacher = weight_bytes * spec.params / gpus  # with a LoRA fake score: the one base both use
    generator_parts = trainable_state_parts(spec.params, gpus, options.precision, options.offload_optimizer)
    generator_parts["gathered"] = 4 * spec.largest_layer
    if options.lora_fake_rank > 0:  # the base is the teacher's; only the adapters train
        fake_parts = trainable_state_parts(lora_params(spec, options.lora_fake_rank), gpus, options.precision,
                                           options.offload_optimizer)
        fake_parts["gathered"] = 0.0
    else:
        fake_parts = dict(generator_parts)
    if options.ema:  # the generator's only: the fake score has none
        generator_parts["ema"] = ema_bytes(spec.params, gpus)
    generator, fake = sum(generator_parts.values()), sum(fake_parts.values())
    tokens = (options.resolution // spec.latent_factor) ** 2 + spec.text_tokens
    activations = sum(activation_parts(spec.hidden, spec.blocks, tokens, options.micro_batch, weight_bytes,
                                       options.cfg, NETWORKS if options.activation_checkpointing else ()).values())
    trees = 2 if options.lora_fake_rank > 0 else 3  # network trees holding their own buffers
    parts = {"teacher_params": teacher, "fake_score_states": fake, "generator_states": generator,
             "buffers": trees * weight_bytes * spec.buffers, "activations": activations,
             "overhead": options.overhead_gib * GIB}
    total = sum(parts.values())
    return {"model": spec.name, "tokens": tokens, **asdict(options), **parts, "total": total,
            "fits": total <= options.gpu_gib * GIB, "fake_score_parts": fake_parts, "generator_parts": generator_parts}


NETWORKS = ("generator", "teacher", "fake_score")


def stored_passes(cfg: bool = True) -> dict[str, int]:
    """Forward passes of each network whose activations the generator step keeps for its backward (§3): the
    generator's last call, and teacher and fake score once per CFG branch (input gradients only)."""
    return {"generator": 1, "teacher": 2 if cfg else 1, "fake_score": 2 if cfg else 1}


def activation_parts(hidden: int, blocks: int, tokens: int, micro_batch: int, weight_bytes: float = 2,
                     cfg: bool = True, checkpointed=()) -> dict[str, float]:
    """Bytes of activations each network holds at the generator step's peak (the run's activation peak; the fake
    score step stores 2 passes of one network), for the networks in `checkpointed` recomputing their blocks."""
    per_block_full = 34 * tokens * hidden * (weight_bytes / 2)  # bytes per sample and block
    full = blocks * per_block_full
    kept = blocks * 2 * tokens * hidden * (weight_bytes / 2) + per_block_full  # block inputs + one block recomputed
    return {name: micro_batch * passes * (kept if name in checkpointed else full)
            for name, passes in stored_passes(cfg).items()}


def choose_checkpointed(hidden: int, blocks: int, tokens: int, micro_batch: int, budget: float,
                        weight_bytes: float = 2, cfg: bool = True) -> tuple[tuple[str, ...], float]:
    """Activation checkpointing only where memory needs it: of the 8 subsets of the three networks, those whose
    activations (`activation_parts`) fit `budget` bytes, the one recomputing the fewest forward passes (ties: the
    smaller footprint); all three when none fits. Returns (networks to checkpoint, their predicted bytes)."""
    from itertools import combinations

    passes = stored_passes(cfg)
    best = None
    for size in range(len(NETWORKS) + 1):
        for subset in combinations(NETWORKS, size):
            total = sum(activation_parts(hidden, blocks, tokens, micro_batch, weight_bytes, cfg, subset).values())
            key = (sum(passes[n] for n in subset), total)
            if total <= budget and (best is None or key < best[0]):
                best = (key, subset)
    if best is None:
        return NETWORKS, sum(activation_parts(hidden, blocks, tokens, micro_batch, weight_bytes, cfg, NETWORKS).values())
    return best[1], best[0][1]


def min_gpus(spec: ModelSpec, options: PlanOptions, limit: int = 4096) -> tuple[int, dict] | None:
    """The fewest GPUs of `options.gpu_gib` on which `options` fits, and the plan there; None if none up to
    `limit` does (activations and overhead alone exceed one GPU). Per-GPU memory depends on the total GPU count
    only; nodes = ceil(gpus / gpus_per_node)."""
    for gpus in range(1, limit + 1):
        result = plan(spec, replace(options, gpus_per_node=gpus, nodes=1))
        if result["fits"]:
            return gpus, result
    return None


def describe_min_gpus(answer: tuple[int, dict] | None, gpus_per_node: int = 8) -> str:
    """'4 (1 node, 68.9 GiB)' or 'none' for a `min_gpus` answer."""
    if answer is None:
        return "none (activations + overhead alone exceed one GPU)"
    gpus, result = answer
    nodes = -(-gpus // gpus_per_node)
    return f"{gpus} ({nodes} node{'s' if nodes > 1 else ''} of {gpus_per_node}, {result['total'] / GIB:.1f} GiB)"


def format_row(result: dict) -> str:
    gib = {k: result[k] / GIB for k in ("teacher_params", "fake_score_states", "generator_states", "activations", "total")}
    flags = []
    if result["activation_checkpointing"]:
        flags.append("ckpt")
    if result["offload_optimizer"]:
        flags.append("offload")
    if result["lora_fake_rank"]:
        flags.append(f"lora{result['lora_fake_rank']}")
    if result.get("ema"):
        flags.append("ema")
    gpus = result["gpus_per_node"] * result["nodes"]
    verdict = "fits" if result["fits"] else "OOM"
    return (f"| {result['model']} | {result['resolution']} | {result['micro_batch']} | {'+'.join(flags) or '-'} | "
            f"{gib['teacher_params']:.1f} | {gib['fake_score_states']:.1f} | {gib['generator_states']:.1f} | "
            f"{gib['activations']:.1f} | {gib['total']:.1f} | {gpus}×{result['gpu_gib']:.0f} GB: {verdict} |")


HEADER = ("| teacher | px | micro-batch | options | teacher GiB | fake score GiB | generator GiB | activations GiB | "
          "total GiB/GPU | verdict |\n|---|---|---|---|---|---|---|---|---|---|")


def spec_from_module(module, name: str, hidden: int, blocks: int, text_tokens: int, latent_factor: int,
                     lora_targets: tuple[str, ...] | None = None) -> ModelSpec:
    """A ModelSpec counted from a module (real, or built on the meta device: no weights needed), with the LoRA
    adapter size `make_lora_fake_score(module, r, target_modules=lora_targets)` would add per unit of rank."""
    from sid_fast.models.lora import lora_params_per_rank

    params = sum(p.numel() for p in module.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    try:
        per_rank = float(lora_params_per_rank(module, lora_targets))
    except ValueError:  # no linear layer to adapt
        per_rank = 0.0
    return ModelSpec(name, float(params), float(largest), hidden, blocks, text_tokens, latent_factor, per_rank,
                     float(buffers))
