"""From a config and a teacher bundle to an engine: `build_engine(config, bundle)` makes the fake score and
generator (copies of the teacher or the bundle's student; a LoRA fake score with teacher.fake_lora_rank), casts the
frozen teacher (teacher.frozen_dtype) and picks the engine from `config.engine.kind` (local | deepspeed).

Engines only: the whole training run (teacher, data, trainer, evaluation, export) is composed above the trainer, in
`sid_fast.composition`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sid_fast.config import SiDConfig


def build_engine(config: SiDConfig, bundle, fake_score: nn.Module | None = None, generator: nn.Module | None = None):
    """The engine named by `config.engine.kind` holding bundle.teacher and copies of the student."""
    if fake_score is None and config.teacher.fake_lora_rank:
        from sid_fast.models.lora import make_lora_fake_score

        # the fake score shares the frozen teacher's weights and trains LoRA adapters only
        fake_score = make_lora_fake_score(bundle.teacher.requires_grad_(False), config.teacher.fake_lora_rank,
                                          seed=config.train.seed)
    if fake_score is None or generator is None:  # copies of the student (or teacher) for whichever was not given
        source = bundle.teacher if bundle.student is None else bundle.student
        if not any(True for _ in source.parameters()):
            raise ValueError("the teacher has no parameters to copy; pass `student=` (a network of the teacher's shape)")
        fake_score = copy.deepcopy(source).requires_grad_(True) if fake_score is None else fake_score
        generator = copy.deepcopy(source).requires_grad_(True) if generator is None else generator
    frozen = config.teacher.frozen_dtype
    if frozen and frozen != config.teacher.dtype:  # after the students were copied from it
        if config.engine.kind == "deepspeed":
            raise ValueError("config field teacher.frozen_dtype: the DeepSpeed engine holds all three networks in "
                             "one dtype (engine.bf16=true keeps the teacher in bf16 without fp32 masters); leave "
                             "teacher.frozen_dtype empty with engine.kind=deepspeed")
        bundle.teacher.to(getattr(torch, frozen))
    checkpointed = resolve_checkpointed(config, bundle, fake_score, generator)
    if config.engine.kind == "local":
        from sid_fast.engine.local import LocalEngine

        return LocalEngine(bundle.teacher, fake_score, generator, config.optim, grad_accum=config.train.grad_accum,
                           ema_decay=config.train.ema_decay, device=config.train.device, checkpointed=checkpointed)
    from sid_fast.engine.zero3 import DeepSpeedEngine

    return DeepSpeedEngine(bundle.teacher, fake_score, generator, config.optim, config.train, config.engine,
                           checkpointed=checkpointed)


def text_tokens(config: SiDConfig) -> int:
    """Text tokens in the joint attention sequence of the teacher family (0: text enters by cross-attention)."""
    kind, length = config.teacher.kind, config.teacher.max_sequence_length
    if kind == "sd3":
        return 77 + (length or 256)  # CLIP-L/G tokens + T5 tokens
    if kind == "flux":
        return length or 512
    if kind == "shapes":
        return length or 20  # MiniLM tokens
    return 0  # sana (cross-attention), vector teachers


def transformer_geometry(module: nn.Module) -> tuple[int, int, int] | None:
    """(hidden, blocks, patch) of the diffusers transformer inside `module`, or None when it has none."""
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None, c=cfg: getattr(c, k, d))
        if cfg is not None and get("num_layers") and get("num_attention_heads") and get("attention_head_dim"):
            blocks = get("num_layers") + (get("num_single_layers") or 0)  # FLUX: double + single blocks
            return get("num_attention_heads") * get("attention_head_dim"), blocks, get("patch_size") or 1
    return None


def resolve_checkpointed(config: SiDConfig, bundle, fake_score: nn.Module, generator: nn.Module) -> tuple[str, ...]:
    """The networks whose blocks recompute their activations: none without engine.activation_checkpointing, those
    named by engine.checkpoint_networks, or with `auto` the choice of `planner.choose_checkpointed` for this run's
    per-device budget (engine.memory_gib or the CUDA device's memory, less the model states counted on the built
    networks and the planner's overhead). On the CPU with memory_gib 0 nothing is checkpointed."""
    import os

    from sid_fast.engine import planner

    engine = config.engine
    if not engine.activation_checkpointing:
        return ()
    names = tuple(n.strip() for n in engine.checkpoint_networks.split(",") if n.strip())
    if names != ("auto",):
        return names
    device = torch.device("cuda" if engine.kind == "deepspeed" and torch.cuda.is_available() else config.train.device)
    memory = engine.memory_gib * planner.GIB
    if not memory:
        if device.type != "cuda":
            return ()
        memory = torch.cuda.get_device_properties(device).total_memory
    geometry = transformer_geometry(bundle.teacher)
    if geometry is None:
        raise ValueError("config field engine.checkpoint_networks: `auto` estimates activations from the teacher's "
                         f"diffusers transformer config (num_layers, num_attention_heads, attention_head_dim), and "
                         f"the {config.teacher.kind} teacher ({type(bundle.teacher).__name__}) has none; name the "
                         "networks to checkpoint instead")
    hidden, blocks, patch = geometry
    latent = tuple(bundle.sample_shape)
    tokens = (latent[-2] // patch) * (latent[-1] // patch) + text_tokens(config)
    bf16 = engine.bf16 if engine.kind == "deepspeed" else config.teacher.dtype != "float32"
    weight_bytes = 2 if bf16 or config.train.autocast in ("bfloat16", "float16") else 4
    world = int(os.environ.get("WORLD_SIZE", "1")) if engine.kind == "deepspeed" else 1
    autocast16 = engine.kind == "local" and config.train.autocast in ("bfloat16", "float16")
    states = _model_state_bytes(engine.kind, bundle.teacher, (fake_score, generator), world, bf16,
                                ema=config.train.ema_decay > 0, sharded_ema=engine.sharded_ema, autocast16=autocast16)
    budget = memory - states - planner.PlanOptions.overhead_gib * planner.GIB
    kappa = config.method
    cfg = any(k not in (0.0, 1.0) for k in (kappa.kappa_teacher, kappa.kappa_fake_gen))  # doubled batches (§4)
    if getattr(bundle.teacher, "guidance_mode", None) == "embed" and getattr(bundle.teacher, "has_guidance_embed", False):
        cfg = False  # FLUX.1-dev's guidance is an embedding: one pass per network (sid_fast.models.flux)
    chosen, predicted = planner.choose_checkpointed(hidden, blocks, tokens, config.train.batch_size, budget,
                                                    weight_bytes, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[engine] activation checkpointing auto: {', '.join(chosen) or 'none'} (predicted activations "
              f"{predicted / planner.GIB:.1f} GiB of {max(budget, 0) / planner.GIB:.1f} GiB left after model states "
              f"{states / planner.GIB:.1f} GiB on {memory / planner.GIB:.0f} GiB)", flush=True)
    return chosen


def _model_state_bytes(kind: str, teacher: nn.Module, trained: tuple[nn.Module, ...], world: int, bf16: bool,
                       ema: bool = False, sharded_ema: bool = True, autocast16: bool = False) -> float:
    """Per-device bytes of weights, gradients and Adam states: local engine, counted on the networks as built
    (Adam's two states in the parameter's dtype); ZeRO-3, DeepSpeed's per-parameter bytes (planner). `trained` is
    (fake score, generator). With `ema`, the generator's fp32 EMA copy (ZeRO-3: a partition of it with
    `sharded_ema`). With `autocast16` (local engine under 16-bit autocast), the 16-bit copies of the fp32 trained
    weights that autocast makes and the backward keeps until it has run (2 bytes each)."""
    from sid_fast.engine import planner

    seen, frozen, trainable, fp32_trainable, generator = set(), 0.0, 0.0, 0, 0
    for module in (teacher, *trained):
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * (p.element_size() if kind == "local" else 1)  # ZeRO-3: counted in parameters
            if p.requires_grad and module is not teacher:
                trainable += size
                fp32_trainable += p.numel() if p.dtype == torch.float32 else 0
                generator += p.numel() if module is trained[-1] else 0
            else:
                frozen += size
    shadow = planner.ema_bytes(generator, world, sharded_ema) if ema else 0.0
    if kind == "local":  # weight + gradient + Adam m and v
        return frozen + 4 * trainable + shadow + (2 * fp32_trainable if autocast16 else 0)
    parts = planner.trainable_state_parts(trainable, world, "bf16" if bf16 else "fp32")
    return (2 if bf16 else 4) * frozen / world + sum(parts.values()) + shadow
