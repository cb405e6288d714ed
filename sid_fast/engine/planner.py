"""Memory planner for SiD under ZeRO-3: per-GPU bytes of parameters, gradients, optimizer states and activations.

Model states follow DeepSpeed's own ZeRO-3 estimator (`estimate_zero3_model_states_mem_needs`): a trainable
network costs 18 bytes per parameter over all GPUs (bf16 weight 2 + bf16 gradient 2 + fp32 master, Adam m and
v 12 + 2 of fp32 gradient-partition slack) plus 4 bytes per parameter of the largest layer (gathered and
prefetched); with the optimizer offloaded only the 2-byte partitions stay on the GPU. The frozen teacher holds
only its bf16 partitions (2 bytes). A LoRA fake score shares the teacher's weights and trains only its adapters.

Activations (DESIGN §3): the generator step backpropagates through the generator's last call (1 pass of the
micro-batch) and, as input gradients, through teacher and fake score with CFG (2 passes each when κ ∉ {0, 1}):
5 stored passes; the fake-score step stores 2. A transformer block stores about 34·S·h bytes per sample in bf16
with fused attention (Korthikanti et al. 2022, without the a·S² term); with activation checkpointing only the
block input 2·S·h per block is kept, plus one block being recomputed. Numbers are estimates: see
docs/distributed.md for how they compare with DeepSpeed's estimator and measured runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


# Public configs of the diffusers transformers (param counts from the released checkpoints).
MODELS = {
    "sana-1.6b": ModelSpec("SANA 1.6B", 1.60e9, 30.1e6, 2240, 20, 0, 32),
    "sd3-medium": ModelSpec("SD3-Medium", 2.03e9, 14.2e6, 1536, 24, 333, 16),
    "sd35-medium": ModelSpec("SD3.5-Medium", 2.47e9, 14.2e6, 1536, 24, 333, 16),
    "sd35-large": ModelSpec("SD3.5-Large", 8.06e9, 35.5e6, 2432, 38, 333, 16),
    "flux-dev": ModelSpec("FLUX.1-dev", 11.90e9, 56.6e6, 3072, 57, 512, 16),
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
    """LoRA adapters on the q, k, v, out and two MLP projections of every block: r·(in + out) each."""
    h = spec.hidden
    per_block = rank * (4 * 2 * h + 2 * (h + 4 * h))
    return spec.blocks * per_block


def plan(spec: ModelSpec, options: PlanOptions) -> dict:
    """Per-GPU memory (bytes) by part and the verdict for `options`."""
    gpus = options.gpus_per_node * options.nodes
    weight_bytes = 2 if options.precision == "bf16" else 4
    teacher = weight_bytes * spec.params / gpus
    generator = zero3_model_state_bytes(spec.params, spec.largest_layer, gpus, options.nodes, options.offload_optimizer)
    if options.lora_fake_rank > 0:  # weights shared with the teacher; only adapters train
        fake = zero3_model_state_bytes(lora_params(spec, options.lora_fake_rank), 0, gpus, options.nodes,
                                       options.offload_optimizer)
    else:
        fake = generator
    tokens = (options.resolution // spec.latent_factor) ** 2 + spec.text_tokens
    per_block_full = 34 * tokens * spec.hidden * (weight_bytes / 2)  # bytes per sample
    if options.activation_checkpointing:
        per_pass = spec.blocks * 2 * tokens * spec.hidden * (weight_bytes / 2) + per_block_full
    else:
        per_pass = spec.blocks * per_block_full
    passes = 1 + (2 if options.cfg else 1) * 2  # generator + teacher + fake score (§3)
    activations = options.micro_batch * passes * per_pass
    parts = {"teacher_params": teacher, "fake_score_states": fake, "generator_states": generator,
             "activations": activations, "overhead": options.overhead_gib * GIB}
    total = sum(parts.values())
    return {"model": spec.name, "tokens": tokens, **asdict(options), **parts, "total": total,
            "fits": total <= options.gpu_gib * GIB}


def format_row(result: dict) -> str:
    gib = {k: result[k] / GIB for k in ("teacher_params", "fake_score_states", "generator_states", "activations", "total")}
    flags = []
    if result["activation_checkpointing"]:
        flags.append("ckpt")
    if result["offload_optimizer"]:
        flags.append("offload")
    if result["lora_fake_rank"]:
        flags.append(f"lora{result['lora_fake_rank']}")
    gpus = result["gpus_per_node"] * result["nodes"]
    verdict = "fits" if result["fits"] else "OOM"
    return (f"| {result['model']} | {result['resolution']} | {result['micro_batch']} | {'+'.join(flags) or '-'} | "
            f"{gib['teacher_params']:.1f} | {gib['fake_score_states']:.1f} | {gib['generator_states']:.1f} | "
            f"{gib['activations']:.1f} | {gib['total']:.1f} | {gpus}×{result['gpu_gib']:.0f} GB: {verdict} |")


HEADER = ("| teacher | px | micro-batch | options | teacher GiB | fake score GiB | generator GiB | activations GiB | "
          "total GiB/GPU | verdict |\n|---|---|---|---|---|---|---|---|---|---|")


def spec_from_module(module, name: str, hidden: int, blocks: int, text_tokens: int, latent_factor: int) -> ModelSpec:
    """A ModelSpec counted from a module (real, or built on the meta device: no weights needed)."""
    params = sum(p.numel() for p in module.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return ModelSpec(name, float(params), float(largest), hidden, blocks, text_tokens, latent_factor)
