"""From the config to an in-loop evaluator: `build_evaluator(config, conditions, sample_shape)` (docs/evaluation.md).

`sid-fast distill` (sid_fast.composition.run_training) and `sid_fast.distill` call it when `eval.every_images > 0`.

- Prompt set (`eval_prompt_set`): the first `eval.num_samples` prompts, fixed, cycled when there are fewer: the
  records of `data.shards` in shard order (manifest order, tar order; not the training shuffle), else the encoded
  `teacher.prompts` in file order (any `EmbeddingConditions` bank), else class labels i mod C for the toy mixtures
  (-1 when unconditional), else one draw of the condition source with a generator seeded by `eval.seed`. Sample i
  uses noise seed `eval.seed + i` (InLoopEvaluator).
- Metric (`build_metric`, `eval.metric`): `fd` (`fd_features` of the samples vs `eval.reference`, or vs the exact
  mixture for the toy teachers), `fid` (Inception from `eval.inception_weights` vs `eval.reference`, on images
  decoded by the teacher's VAE), `clip` (`eval.clip_model`, decoded images vs the prompt texts), `shapes` (the
  ShapesWorld checker's correctness; plus the Fréchet distance of feature-net features against rendered truth
  when `eval.shapes_features` or the shipped feature net exists). Errors name the field that is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sid_fast.models.protocol import Conditioning

SHAPES_TRUTH_MIN = 512
"""Rendered ground-truth images behind the `shapes` metric's Fréchet reference (at least; 4 per prompt slot)."""


# ---------------------------------------------------------------- the fixed prompt set


def first_shard_samples(directory: str | Path, count: int) -> tuple[Conditioning, list[str]]:
    """The first `count` good samples of a shard directory in manifest order (tar order inside a shard): their
    conditioning (embeds / pooled / mask, stored dtype) and prompt texts; fewer when the shards hold fewer."""
    from sid_fast.data.conditions import COND_FIELDS
    from sid_fast.data.format import (
        BadSample,
        ShardDamage,
        ShardError,
        ShardManifest,
        decode_sample,
        read_members,
        scan_tar,
    )

    directory = Path(directory)
    manifest = ShardManifest.load(directory)
    samples: list[dict] = []
    for index, entry in enumerate(manifest.shards):
        path = directory / entry["name"]
        with open(path, "rb") as handle:
            for record in scan_tar(path, index):
                if isinstance(record, ShardDamage) or len(samples) == count:
                    break
                try:
                    samples.append(decode_sample(read_members(handle, record), manifest.fields))
                except BadSample:
                    continue
        if len(samples) == count:
            break
    if not samples:
        raise ShardError(f"config field data.shards: {directory} holds no readable sample for the evaluation prompts")
    cond = Conditioning(**{name: torch.stack([s[name] for s in samples]) for name in manifest.fields if name in COND_FIELDS})
    return cond, [s["prompt"] for s in samples]


def _cycle(cond: Conditioning, texts: list[str] | None, count: int) -> tuple[Conditioning, list[str] | None]:
    index = torch.arange(count) % len(cond)
    return cond[index], ([texts[i] for i in index.tolist()] if texts is not None else None)


def eval_prompt_set(config, conditions) -> tuple[Conditioning, list[str] | None]:
    """(Conditioning of eval.num_samples, their prompt texts or None), fixed for the whole run (see the module doc)."""
    from sid_fast.data.conditions import ShardConditions
    from sid_fast.models.mixture import LabelConditions

    count = config.eval.num_samples
    if isinstance(conditions, ShardConditions):
        cond, texts = first_shard_samples(conditions.directory, count)
        if conditions.dtype is not None:  # as the training stream serves them
            cond = cond.to(dtype=conditions.dtype)
        return _cycle(cond, texts, count)
    bank = getattr(conditions, "bank", None)
    if isinstance(bank, Conditioning):
        return _cycle(bank, getattr(conditions, "prompts", None), count)
    if isinstance(conditions, LabelConditions):
        if conditions.num_classes == 0:
            return conditions.unconditional(count), None
        return Conditioning(labels=torch.arange(count) % conditions.num_classes), None
    return conditions.sample(count, torch.Generator().manual_seed(config.eval.seed)).to("cpu"), None


# ---------------------------------------------------------------- decoding latents to images


class VAEDecoder:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] through a diffusers VAE: x = D(z / scale + shift), the
    inverse of `sid_fast.data.encoding.VAELatentEncoder` (shift/scale from the VAE config)."""

    def __init__(self, vae: torch.nn.Module, batch_size: int = 16):
        self.vae = vae.eval().requires_grad_(False)
        config = getattr(vae, "config", {})
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)
        self.scale = float(getattr(config, "scaling_factor", None) or 1.0)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        parameter = next(self.vae.parameters())
        if parameter.device != latents.device:
            self.vae.to(latents.device)
        images = [self.vae.decode(part.to(parameter.dtype) / self.scale + self.shift).sample.float()
                  for part in latents.split(self.batch_size)]
        return torch.cat(images).clamp(-1, 1)


def build_decoder(teacher_config) -> VAEDecoder | None:
    """The teacher's own VAE decoder for the diffusers families (teacher.path's `vae/`, or the tiny preset's seeded
    VAE as `tiny_components.pipeline` builds it); None for pixel-space and vector teachers (shapes, mixture)."""
    if teacher_config.kind not in ("sd3", "flux", "sana"):
        return None
    import diffusers

    from sid_fast.data.encoding import FAMILY_VAES

    if teacher_config.path is not None:
        directory = Path(teacher_config.path) / "vae"
        if not (directory / "config.json").is_file():
            return None  # a generator export: no VAE to decode with
        vae = getattr(diffusers, FAMILY_VAES[teacher_config.kind]).from_pretrained(str(directory), local_files_only=True)
        return VAEDecoder(vae)
    if teacher_config.preset is not None:
        from sid_fast.models import tiny_components

        return VAEDecoder(tiny_components.seeded(lambda: tiny_components.vae(teacher_config.kind, teacher_config.preset), 2))
    return None


# ---------------------------------------------------------------- metrics


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def _fd_reference(config, sample_shape, cond: Conditioning, reference):
    from sid_fast.eval.metrics import FeatureStats, fd_features, load_reference

    ev = config.eval
    dim = fd_features(torch.zeros(2, *sample_shape)).shape[1]
    if ev.reference is not None:
        mu, sigma = load_reference(ev.reference)
        if mu.shape != (dim,):
            raise ValueError(f"config field eval.reference: {ev.reference} holds {mu.shape[0]}-d features; eval.metric=fd "
                             f"on samples {tuple(sample_shape)} needs {dim} (make them with "
                             "sid_fast.eval.metrics.write_reference(fd_features(x), path))")
        return mu, sigma
    if reference is not None and hasattr(reference, "sample") and cond.labels is not None:
        # the exact mixture (toy teachers): 16 draws per evaluation prompt slot, same labels
        labels = cond.labels.cpu().repeat(16)
        stats = FeatureStats(dim)
        stats.update(fd_features(reference.sample(len(labels), labels, generator=torch.Generator().manual_seed(ev.seed + 1))))
        return stats.mean_cov()
    raise ValueError("config field eval.reference: eval.metric=fd needs reference features (a safetensors file with "
                     f"`features` (N, {dim}) or `mu`/`sigma` of sid_fast.eval.metrics.fd_features on real samples); "
                     "only the exact mixture teachers provide their own")


def _shapes_metric(config, sample_shape, texts: list[str] | None):
    from sid_fast.eval.metrics import FeatureStats, ShapesScore
    from sid_fast.shapes.captions import parse_caption
    from sid_fast.shapes.evaluate import rendered_truth
    from sid_fast.shapes.features import SHIPPED_FEATURES, features, load_feature_net

    ev = config.eval
    if not (len(sample_shape) == 3 and sample_shape[0] == 3 and sample_shape[1] == sample_shape[2]):
        raise ValueError(f"config field eval.metric: shapes scores (3, R, R) pixel-space samples (teacher.kind=shapes), "
                         f"this run samples {tuple(sample_shape)}")
    if texts is None:
        raise ValueError("config field eval.metric: shapes checks images against their captions, and the evaluation "
                         "prompts have no texts; give teacher.prompts or data.shards")
    for text in dict.fromkeys(texts):
        try:
            parse_caption(text)
        except ValueError as error:
            raise ValueError(f"config field eval.metric: shapes needs ShapesWorld captions for every evaluation "
                             f"prompt: {error}") from None
    path = Path(ev.shapes_features) if ev.shapes_features is not None else SHIPPED_FEATURES
    if not path.is_file():  # the shipped net is optional: correctness alone
        return ShapesScore()
    net = load_feature_net(path)
    truth = rendered_truth(texts, max(4 * len(texts), SHAPES_TRUTH_MIN), seed=ev.seed, resolution=sample_shape[-1])
    values = features(net, truth)
    stats = FeatureStats(values.shape[1])
    stats.update(values)
    return ShapesScore(net, stats.mean_cov())


def build_metric(config, sample_shape: tuple[int, ...], cond: Conditioning, texts: list[str] | None,
                 reference=None, decoder=None, device="cpu"):
    """The metric object of `eval.metric` (see the module doc); `reference`: the teacher's exact ground truth (toys)."""
    from sid_fast.eval.metrics import (
        ClipScore,
        FrechetMetric,
        InceptionFeatures,
        fd_features,
        load_inception,
        load_reference,
    )

    ev = config.eval
    if ev.metric == "fd":
        return FrechetMetric(fd_features, _fd_reference(config, sample_shape, cond, reference))
    if ev.metric == "shapes":
        return _shapes_metric(config, sample_shape, texts)
    if decoder is None and not _is_image(sample_shape):
        raise ValueError(f"config field eval.metric: {ev.metric} scores images; the samples {tuple(sample_shape)} are not "
                         f"images and teacher.kind={config.teacher.kind} has no VAE to decode them with")
    if ev.metric == "fid":
        for name in ("inception_weights", "reference"):
            if getattr(ev, name) is None:
                raise ValueError(f"config field eval.{name}: eval.metric=fid needs it (see docs/evaluation.md)")
        return FrechetMetric(InceptionFeatures(load_inception(ev.inception_weights)).to(device), load_reference(ev.reference))
    if ev.metric == "clip":
        if ev.clip_model is None:
            raise ValueError("config field eval.clip_model: eval.metric=clip needs a local CLIP directory")
        if texts is None:
            raise ValueError("config field eval.metric: clip scores images against their prompt texts, and the "
                             "evaluation prompts have none; give teacher.prompts or data.shards")
        return ClipScore(ev.clip_model, device)
    raise ValueError(f"config field eval.metric: unknown metric {ev.metric!r}")


def build_evaluator(config, conditions, sample_shape: tuple[int, ...], *, reference=None, device="cpu"):
    """An InLoopEvaluator for `config.eval` (None when eval.every_images is 0): the fixed prompt set, the metric and,
    for `fid`/`clip` on latents, the teacher's VAE decoder."""
    from sid_fast.eval.inloop import InLoopEvaluator

    if config.eval.every_images <= 0:
        return None
    sample_shape = tuple(sample_shape)
    cond, texts = eval_prompt_set(config, conditions)
    decoder = build_decoder(config.teacher) if config.eval.metric in ("fid", "clip") and not _is_image(sample_shape) else None
    metric = build_metric(config, sample_shape, cond, texts, reference, decoder, device)
    return InLoopEvaluator(config, cond, metric, decoder, texts if getattr(metric, "uses_prompts", False) else None)
