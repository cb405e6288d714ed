"""`sid-fast pretrain`: flow-matching training of the ShapesWorld teacher (§1) on scenes rendered on the fly.

Loss: `sid_fast.pretrain.flow_matching_loss` with caption dropout (the unconditional is the encoded "", §1, for CFG).
Adam (β 0.9/0.999) with a linear learning-rate warm-up, optional gradient-norm clipping, and an EMA of the weights with a
warm-up (decay min(ema, (1 + step) / (10 + step))) so early EMA weights do not hold the random init.
Checkpoints are atomic and verified (`sid_fast.checkpoint`); rerunning the same command resumes from the newest.

Writes under out_dir: captions/ (caption sets + encoded bank), checkpoints/, log.jsonl (one line per log step),
teacher.safetensors (EMA weights in float16, config and card in the metadata) and MODEL_CARD.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sid_fast.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from sid_fast.flow import TIME_SCHEMES
from sid_fast.pretrain import flow_matching_loss


@dataclass
class PretrainConfig:
    out_dir: str = "runs/shapes-teacher"
    """Run directory: checkpoints, log.jsonl, teacher.safetensors, MODEL_CARD.md."""
    preset: str = "base"
    """Architecture from `sid_fast.models.shapes.PRESETS` (tiny, small, base)."""
    steps: int = 12000
    """Optimiser steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 3e-4
    """Adam learning rate after the warm-up."""
    warmup_steps: int = 200
    """Steps of linear learning-rate warm-up from 0."""
    grad_clip: float = 0.0
    """Gradient-norm clipping (0: off; the loss is summed over 3·32·32 elements, so norms are in the thousands)."""
    cond_dropout: float = 0.1
    """Fraction of samples trained with the unconditional (empty-prompt) conditioning, for CFG."""
    two_object_fraction: float = 0.25
    """Fraction of training captions drawn from the two-object set."""
    time_scheme: str = "logit_normal"
    """Training-time distribution (`sid_fast.flow.sample_time`)."""
    time_mean: float = 0.0
    """logit-normal mean (SD3's pretraining uses 0)."""
    time_std: float = 1.0
    """logit-normal standard deviation."""
    ema: float = 0.999
    """EMA decay of the exported weights (with warm-up); 0: export the raw weights."""
    checkpoint_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    log_every: int = 10
    """Steps between log.jsonl lines."""
    seed: int = 0
    """Seed of the initialisation and of the data/noise stream."""
    encoder: str = "minilm"
    """Text encoder: `minilm` (the real one) or `tiny` (an in-code 384-wide encoder, for tests)."""
    max_sequence_length: int = 20
    """Text tokens per caption."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    device: str = "cpu"
    """Torch device of the model (cpu, cuda, cuda:1); scenes are rendered and noise drawn on the CPU either way."""
    max_captions: int = 0
    """Use at most this many training captions per set, evenly spaced (0: all); for tests and quick runs."""

    def __post_init__(self) -> None:
        from sid_fast.models.shapes import PRESETS

        checks = [(self.preset in PRESETS, "preset", f"unknown architecture {self.preset!r}; known: {sorted(PRESETS)}"),
                  (self.steps >= 1, "steps", "must be >= 1"), (self.batch_size >= 1, "batch_size", "must be >= 1"),
                  (self.lr > 0, "lr", "must be > 0"), (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
                  (0 <= self.cond_dropout < 1, "cond_dropout", "must be in [0, 1)"),
                  (0 <= self.two_object_fraction <= 1, "two_object_fraction", "must be in [0, 1]"),
                  (self.time_scheme in TIME_SCHEMES, "time_scheme", f"must be one of {TIME_SCHEMES}"),
                  (0 <= self.ema < 1, "ema", "must be in [0, 1)"),
                  (self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
                  (self.log_every >= 1, "log_every", "must be >= 1"), (self.max_captions >= 0, "max_captions", ">= 0"),
                  (self.encoder in ("minilm", "tiny"), "encoder", "must be minilm or tiny")]
        try:
            torch.device(self.device)
        except RuntimeError:
            checks.append((False, "device", "is not a torch device"))
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"pretrain option {name}: {message} (got {getattr(self, name)!r})")


RESUME_FIELDS = ("preset", "batch_size", "cond_dropout", "two_object_fraction", "time_scheme", "time_mean", "time_std",
                 "ema", "seed", "encoder", "max_sequence_length", "max_captions")
"""Options a resumed run must share with the checkpoint (the others, e.g. steps or lr, may change)."""


class _PretrainState:
    """Model, EMA and optimiser behind the engine interface `sid_fast.checkpoint` saves (one process)."""

    rank, world_size = 0, 1

    def __init__(self, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.ema, self.optimizer = model, ema, optimizer

    def barrier(self) -> None:
        pass

    def save_state(self, directory: Path) -> None:
        for name, module in (("model", self.model), ("ema", self.ema)):
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                      str(directory / f"{name}.safetensors"))
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        device = next(self.model.parameters()).device
        self.model.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(device)))
        self.ema.load_state_dict(load_file(str(directory / "ema.safetensors"), device=str(device)))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))


def build_text_encoder(config: PretrainConfig):
    """The MiniLM encoder, or for tests an in-code tiny encoder of the same width (384)."""
    if config.encoder == "tiny":
        from sid_fast.data.tiny import TinyPromptEncoder

        return TinyPromptEncoder(dim=384, max_length=config.max_sequence_length, seed=config.seed)
    from sid_fast.encoders.minilm import MiniLMEncoder

    return MiniLMEncoder(max_length=config.max_sequence_length, device=config.device)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema ← d·ema + (1 − d)·model with d = min(decay, (1 + step) / (10 + step)) (warm-up)."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)


def pretrain(config: PretrainConfig, progress: bool = True) -> Path:
    """Train (or resume) the teacher of `config`; returns the path of teacher.safetensors."""
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import save_shapes_transformer, shapes_transformer
    from sid_fast.shapes.data import ShapesData, write_caption_files

    torch.set_flush_denormal(True)  # ENVIRONMENT.md: 17× on CPU once denormals appear
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    write_caption_files(out / "captions")
    encoder = build_text_encoder(config)
    data = ShapesData.from_world(encoder, two_object_fraction=config.two_object_fraction,
                                 cache=out / "captions" / f"bank-{config.encoder}.safetensors", progress=progress,
                                 max_captions=config.max_captions)
    if hasattr(encoder, "release"):
        encoder.release()
    device = torch.device(config.device)
    model = SD3Adapter(shapes_transformer(config.preset, seed=config.seed)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    null = data.unconditional(config.batch_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))
    state = _PretrainState(model, ema, optimizer)
    rng = torch.Generator().manual_seed(config.seed)
    step, elapsed = 0, 0.0
    checkpoints = out / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is not None:
        saved = load_checkpoint(latest, state, rng)
        differ = {k: (saved["config"].get(k), getattr(config, k)) for k in RESUME_FIELDS
                  if saved["config"].get(k) != getattr(config, k)}
        if differ:
            raise ValueError(f"{latest} was written with other options {differ} (checkpoint, now); "
                             f"use another out_dir or the same options")
        step, elapsed = saved["step"], saved["elapsed_s"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="pretrain shapes teacher", unit="step")
    model.train()
    window, started = [], time.perf_counter()
    with open(out / "log.jsonl", "a") as log:
        while step < config.steps:
            lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, cond = data.sample(config.batch_size, rng)
            images, cond = images.to(device, non_blocking=True), cond.to(device)
            loss = flow_matching_loss(model, images, cond, null, rng, config.cond_dropout, config.time_scheme,
                                      mean=config.time_mean, std=config.time_std)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretrain: loss is {loss.item()} at step {step}; lower lr ({config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            optimizer.step()
            update_ema(ema, model, config.ema, step)
            step += 1
            window.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]:.3f}")
            now = time.perf_counter()
            if step % config.log_every == 0 or step == config.steps:
                seconds = now - started
                log.write(json.dumps({"step": step, "loss": sum(window) / len(window), "lr": lr,
                                      "grad_norm": float(grad_norm), "s_per_step": seconds / len(window),
                                      "images_per_s": len(window) * config.batch_size / seconds}) + "\n")
                log.flush()
                elapsed += seconds
                window, started = [], now
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(checkpoints, step, state, {"step": step, "elapsed_s": elapsed,
                                                           "config": dataclasses.asdict(config)}, rng_state(rng))
    if bar is not None:
        bar.close()
    model.eval()
    exported = ema if config.ema > 0 else model
    machine = f"{platform.machine()} {platform.processor()} torch {torch.__version__} threads {torch.get_num_threads()}"
    if device.type == "cuda":
        machine += f" on {torch.cuda.get_device_name(device)}"
    card = {"recipe": "sid-fast pretrain", "config": dataclasses.asdict(config), "steps": step,
            "train_seconds": round(elapsed, 1), "machine": machine, "weights": "ema" if config.ema > 0 else "raw",
            "command": " ".join(sys.argv)}
    path = save_shapes_transformer(exported.transformer, out / "teacher.safetensors", torch.float16, card)
    write_model_card(out / "MODEL_CARD.md", card)
    return path


def write_model_card(path: Path, card: dict, scores: dict | None = None) -> Path:
    """A Markdown card: how the teacher was made (and, when given, what it scores)."""
    lines = ["# ShapesWorld teacher", "",
             "A diffusers SD3Transformer2DModel in pixel space (3×32×32) conditioned on all-MiniLM-L6-v2 text states, "
             "trained from scratch with flow matching on procedurally rendered ShapesWorld scenes "
             "(docs/shapes.md).", "",
             f"- recipe: `{card['recipe']}`, {card['steps']} steps in {card['train_seconds']} s on {card['machine']}",
             f"- command: `{card['command']}`", f"- exported weights: {card['weights']}, float16", "",
             "## Configuration", "", "```json", json.dumps(card["config"], indent=1), "```", ""]
    if scores:
        lines += ["## Scores (held-out prompts, 95% Wilson intervals)", "",
                  "| sampler | prompts | correct |", "|---|---|---|"]
        lines += [f"| {name} | {prompts} | {value} |" for (name, prompts), value in scores.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def evaluate_and_card(config: PretrainConfig, path: Path, count: int, steps: tuple[int, ...], guidance: float,
                      progress: bool = False) -> dict:
    """Score the teacher at `path` on held-out prompts and rewrite its card (metadata and MODEL_CARD.md)."""
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import load_shapes_transformer, read_card, save_shapes_transformer
    from sid_fast.shapes.evaluate import evaluate_teacher

    teacher = SD3Adapter(load_shapes_transformer(path)).to(config.device)
    encoder = build_text_encoder(config)
    scores = evaluate_teacher(teacher, encoder, count, steps, guidance, config.seed, progress)
    card = read_card(path)
    card["scores"] = {f"{name} | {prompts}": str(value) for (name, prompts), value in scores.items()}
    save_shapes_transformer(teacher.transformer, path, torch.float16, card)
    write_model_card(path.parent / "MODEL_CARD.md", card, scores)
    return scores
