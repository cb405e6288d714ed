"""Analytic FLOPs of the diffusers DiT families (SD3/SD3.5, FLUX.1, SANA) and of one SiD iteration.

Counting rule (what `torch.utils.flop_counter.FlopCounterMode` counts, so the two can be held against each other):
a matrix product of (m × k) by (k × n) is 2·m·k·n FLOPs; a convolution is 2 FLOPs per multiply-add of its weight
over the output; attention is its two batched products, Q·Kᵀ and P·V, 4·S_q·S_kv·d per head (no softmax, no
masking savings); SANA's linear attention is its two matrix products with the ones-padded value, 4·N·d·(d + 1) per
head. Norms, activations, rotary embeddings, residual adds and the optimizer are not counted (elementwise work,
well under 1% of a DiT's FLOPs at real sizes).

`dit_forward_flops(config, batch, image_tokens, text_tokens)` returns the forward of one call split by part
(embeddings, ONE block of each kind, the final layer), so that a depth-cut model can be extrapolated to full depth
(`ForwardFlops.at_depth`). Each part is further split into buckets that say what a backward pass costs:

    x_mm    weight products whose input depends on the latent x (the image stream, and the text stream once the
            joint attention has mixed it with the image);
    x_leaf  weight products applied to the raw input x itself (the patch embedding);
    c_mm    weight products of the conditioning path only (adaLN modulations, time/guidance/pooled embeddings past
            their first layer, the text stream before the first joint attention, SANA's cross-attention K/V);
    c_leaf  weight products applied to raw conditioning (first layers of the time/pooled embeddings, the context
            embedder / caption projection);
    sdpa    softmax-attention products (scaled_dot_product_attention);
    act     activation-by-activation products outside SDPA (SANA's linear attention).

SiD iteration (DESIGN.md §2–§4), forward F of one network call at the micro-batch (a CFG call [∅, c] is one call of
twice the batch, so 2F): the fake-score step is K' generator calls without grad, the fake score's guided forward and
its backward; the generator step is K' generator calls (the last with grad) and its backward, the teacher's and the
fake score's guided forwards and their input-only backwards. The rules used for MFU (`sid_iteration_flops`):
backward of a trained network = 2F, input-gradient-only backward through a frozen network = 1F, recomputation under
activation checkpointing not counted. `counted_iteration_flops` is what FlopCounterMode should read for the same
iteration: backward costs from the buckets (an input-only backward computes no weight gradients and nothing on the
conditioning path; an attention backward is 2.5× its forward, the scores being recomputed), plus the recomputed
block forwards of checkpointed networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BUCKETS = ("x_mm", "x_leaf", "c_mm", "c_leaf", "sdpa", "act")


def _empty() -> dict[str, float]:
    return dict.fromkeys(BUCKETS, 0.0)


def _scaled(part: dict[str, float], factor: float) -> dict[str, float]:
    return {k: v * factor for k, v in part.items()}


def _added(*parts: dict[str, float]) -> dict[str, float]:
    out = _empty()
    for part in parts:
        for k, v in part.items():
            out[k] += v
    return out


def trained_backward(part: dict[str, float]) -> float:
    """FLOPs FlopCounterMode counts for the backward of `part` in a trained network (weight + input gradients;
    layers fed raw inputs compute weight gradients only)."""
    return 2 * part["x_mm"] + part["x_leaf"] + 2 * part["c_mm"] + part["c_leaf"] + 2.5 * part["sdpa"] + 2 * part["act"]


def input_backward(part: dict[str, float]) -> float:
    """FLOPs FlopCounterMode counts for an input-gradient-only backward of `part` through a frozen network
    (no weight gradients; the conditioning path needs no gradient at all)."""
    return part["x_mm"] + part["x_leaf"] + 2.5 * part["sdpa"] + 2 * part["act"]


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one transformer call, by part and bucket (see the module docstring)."""

    family: str
    batch: int
    image_tokens: int
    text_tokens: int
    embed: dict[str, float]
    blocks: dict[str, dict[str, float]]
    """FLOPs of ONE block of each kind (SD3: joint, joint_dual, joint_last; FLUX: double, single; SANA: block)."""
    counts: dict[str, int]
    """How many blocks of each kind the model has."""
    final: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def block_part(self) -> dict[str, float]:
        return _added(*(_scaled(self.blocks[k], n) for k, n in self.counts.items()))

    @property
    def part(self) -> dict[str, float]:
        """All of the call, by bucket."""
        return _added(self.embed, self.block_part, self.final)

    @property
    def total(self) -> float:
        return sum(self.part.values())

    @property
    def blocks_total(self) -> float:
        """FLOPs of all blocks (what activation checkpointing recomputes)."""
        return sum(self.block_part.values())

    @property
    def attention(self) -> float:
        part = self.part
        return part["sdpa"] + part["act"]

    def per_block(self, kind: str) -> float:
        return sum(self.blocks[kind].values())

    def at_depth(self, counts: dict[str, int]) -> ForwardFlops:
        """The same call with other block counts (e.g. a depth-cut model extrapolated to full depth)."""
        unknown = set(counts) - set(self.blocks)
        if unknown:
            raise ValueError(f"unknown block kinds {sorted(unknown)}; this {self.family} model has {sorted(self.blocks)}")
        merged = {**self.counts, **counts}
        return ForwardFlops(self.family, self.batch, self.image_tokens, self.text_tokens, self.embed, self.blocks,
                            merged, self.final, list(self.notes))

    def trained_backward(self) -> float:
        return trained_backward(self.part)

    def input_backward(self) -> float:
        return input_backward(self.part)


# ---------------------------------------------------------------------------------------------------------- helpers


def _mm(tokens: float, fan_in: float, fan_out: float) -> float:
    """2·m·k·n of a linear layer applied to `tokens` rows."""
    return 2.0 * tokens * fan_in * fan_out


def _timestep_embedding(dim: int) -> tuple[float, float]:
    """TimestepEmbedding(256 -> dim -> dim) per sample: the first layer is fed the sinusoid (raw)."""
    return _mm(1, 256, dim), _mm(1, dim, dim)


def _config_dict(config) -> dict:
    return dict(config.items()) if hasattr(config, "items") else dict(vars(config))


def family_of(config) -> str:
    """`sd3`, `flux` or `sana` from a diffusers transformer config (its `_class_name`, else its keys)."""
    config = _config_dict(config)
    name = config.get("_class_name", "")
    if name in ("SD3Transformer2DModel",) or "caption_projection_dim" in config:
        return "sd3"
    if name in ("FluxTransformer2DModel",) or "num_single_layers" in config:
        return "flux"
    if name in ("SanaTransformer2DModel",) or "caption_channels" in config:
        return "sana"
    raise ValueError(f"cannot tell the DiT family of config {sorted(config)}; expected an SD3, FLUX or SANA transformer")


def image_tokens(config, latent_height: int, latent_width: int | None = None) -> int:
    """Image tokens of an unpacked latent of (latent_height, latent_width): patches of patch_size (FLUX: 2x2 packing
    then patch_size 1)."""
    config = _config_dict(config)
    latent_width = latent_height if latent_width is None else latent_width
    family = family_of(config)
    patch = 2 if family == "flux" else int(config.get("patch_size", 1))
    return (latent_height // patch) * (latent_width // patch)


# ---------------------------------------------------------------------------------------------------------- families


def _sd3(c: dict, b: int, n: int, txt: int) -> ForwardFlops:
    heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
    d = heads * head_dim
    p, cin = c.get("patch_size", 2), c.get("in_channels", 16)
    cout = c.get("out_channels") or cin
    layers = c.get("num_layers", 18)
    dual = set(c.get("dual_attention_layers") or ())
    cap = c.get("caption_projection_dim", d)
    if cap != d:
        raise ValueError(f"caption_projection_dim {cap} != inner dim {d}: diffusers' SD3 blocks need them equal")
    s = n + txt
    embed = _empty()
    embed["x_leaf"] += _mm(n, cin * p * p, d)  # patch embedding conv (kernel p, stride p)
    t1, t2 = _timestep_embedding(d)
    embed["c_leaf"] += t1 + _mm(1, c.get("pooled_projection_dim", 2048), d)
    embed["c_mm"] += t2 + _mm(1, d, d)
    embed["c_leaf"] += _mm(txt, c.get("joint_attention_dim", 4096), d)  # context embedder

    def block(dual_attention: bool, last: bool) -> dict[str, float]:
        part = _empty()
        part["c_mm"] += _mm(1, d, (9 if dual_attention else 6) * d)  # norm1 (adaLN-zero; SD3.5's X variant: 9)
        part["c_mm"] += _mm(1, d, (2 if last else 6) * d)  # norm1_context (the last block: adaLN continuous)
        part["x_mm"] += _mm(n, d, 3 * d) + _mm(n, d, d)  # image q, k, v and out
        part["x_mm"] += _mm(txt, d, 3 * d)  # text q, k, v
        part["sdpa"] += 4.0 * s * s * d  # joint attention over image + text tokens
        if not last:
            part["x_mm"] += _mm(txt, d, d)  # to_add_out
        if dual_attention:  # SD3.5 dual attention: a second self-attention over the image tokens
            part["x_mm"] += _mm(n, d, 3 * d) + _mm(n, d, d)
            part["sdpa"] += 4.0 * n * n * d
        part["x_mm"] += _mm(n, d, 4 * d) + _mm(n, 4 * d, d)  # feed-forward, GELU(tanh), 4x
        if not last:
            part["x_mm"] += _mm(txt, d, 4 * d) + _mm(txt, 4 * d, d)
        return _scaled(part, b)

    counts: dict[str, int] = {}
    blocks: dict[str, dict[str, float]] = {}
    for i in range(layers):
        dual_attention, last = i in dual, i == layers - 1
        kind = "joint" + ("_dual" if dual_attention else "") + ("_last" if last else "")
        counts[kind] = counts.get(kind, 0) + 1
        blocks.setdefault(kind, block(dual_attention, last))
    if layers:  # the first block's text q/k/v see the raw text (conditioning only): same FLOPs, another bucket
        embed["c_mm"] += _mm(txt, d, 3 * d)
        embed["x_mm"] -= _mm(txt, d, 3 * d)
    final = _empty()
    final["c_mm"] += _mm(1, d, 2 * d)  # norm_out (adaLN continuous)
    final["x_mm"] += _mm(n, d, p * p * cout)
    return ForwardFlops("sd3", b, n, txt, _scaled(embed, b), blocks, counts, _scaled(final, b))


def _flux(c: dict, b: int, n: int, txt: int) -> ForwardFlops:
    heads, head_dim = c.get("num_attention_heads", 24), c.get("attention_head_dim", 128)
    d = heads * head_dim
    cin = c.get("in_channels", 64)
    p = c.get("patch_size", 1)
    cout = c.get("out_channels") or cin
    s = n + txt
    embed = _empty()
    embed["x_leaf"] += _mm(n, cin, d)  # x_embedder
    t1, t2 = _timestep_embedding(d)
    embed["c_leaf"] += t1 + _mm(1, c.get("pooled_projection_dim", 768), d)
    embed["c_mm"] += t2 + _mm(1, d, d)
    if c.get("guidance_embeds", False):
        embed["c_leaf"] += t1
        embed["c_mm"] += t2
    embed["c_leaf"] += _mm(txt, c.get("joint_attention_dim", 4096), d)  # context embedder

    double = _empty()
    double["c_mm"] += 2 * _mm(1, d, 6 * d)  # norm1, norm1_context
    double["x_mm"] += _mm(n, d, 3 * d) + _mm(n, d, d) + _mm(txt, d, 3 * d) + _mm(txt, d, d)
    double["sdpa"] += 4.0 * s * s * d
    double["x_mm"] += _mm(n, d, 4 * d) + _mm(n, 4 * d, d) + _mm(txt, d, 4 * d) + _mm(txt, 4 * d, d)
    mlp = int(d * c.get("mlp_ratio", 4.0))
    single = _empty()
    single["c_mm"] += _mm(1, d, 3 * d)  # norm (adaLN-zero single)
    single["x_mm"] += _mm(s, d, mlp) + _mm(s, d, 3 * d) + _mm(s, d + mlp, d)  # proj_mlp, q/k/v, proj_out
    single["sdpa"] += 4.0 * s * s * d
    counts = {"double": c.get("num_layers", 19), "single": c.get("num_single_layers", 38)}
    if counts["double"]:  # the first double block's text q/k/v see raw text
        delta = _mm(txt, d, 3 * d)
        embed["c_mm"] += delta
        embed["x_mm"] -= delta
    final = _empty()
    final["c_mm"] += _mm(1, d, 2 * d)
    final["x_mm"] += _mm(n, d, p * p * cout)
    blocks = {"double": _scaled(double, b), "single": _scaled(single, b)}
    return ForwardFlops("flux", b, n, txt, _scaled(embed, b), blocks, counts, _scaled(final, b))


def _sana(c: dict, b: int, n: int, txt: int) -> ForwardFlops:
    heads, head_dim = c.get("num_attention_heads", 70), c.get("attention_head_dim", 32)
    d = heads * head_dim
    cin, p = c.get("in_channels", 32), c.get("patch_size", 1)
    cout = c.get("out_channels") or cin
    embed = _empty()
    embed["x_leaf"] += _mm(n, cin * p * p, d)  # patch embedding conv
    t1, t2 = _timestep_embedding(d)
    embed["c_leaf"] += t1
    embed["c_mm"] += t2 + _mm(1, d, 6 * d)  # AdaLayerNormSingle: timestep MLP + linear to 6 modulations
    if c.get("guidance_embeds", False):
        embed["c_leaf"] += t1
        embed["c_mm"] += t2
    caption = c.get("caption_channels", 2304)
    embed["c_leaf"] += _mm(txt, caption, d)
    embed["c_mm"] += _mm(txt, d, d)  # caption projection (2 layers)

    block = _empty()
    block["x_mm"] += _mm(n, d, 3 * d) + _mm(n, d, d)  # linear self-attention q, k, v, out
    block["act"] += 4.0 * n * head_dim * (head_dim + 1) * heads
    cross_dim = c.get("cross_attention_dim")
    if cross_dim is not None:
        inner2 = c.get("num_cross_attention_heads", 20) * c.get("cross_attention_head_dim", 112)
        block["x_mm"] += _mm(n, d, inner2) + _mm(n, inner2, d)  # q, out
        block["c_mm"] += 2 * _mm(txt, cross_dim, inner2)  # k, v of the text
        block["sdpa"] += 4.0 * n * txt * inner2
    hidden = int(c.get("mlp_ratio", 2.5) * d)  # GLUMBConv: 1x1 to 2·hidden, depthwise 3x3, 1x1 back
    block["x_mm"] += _mm(n, d, 2 * hidden) + 2.0 * n * 2 * hidden * 9 + _mm(n, hidden, d)
    final = _empty()
    final["x_mm"] += _mm(n, d, p * p * cout)
    counts = {"block": c.get("num_layers", 20)}
    return ForwardFlops("sana", b, n, txt, _scaled(embed, b), {"block": _scaled(block, b)}, counts, _scaled(final, b))


def dit_forward_flops(config, batch: int, image_tokens: int, text_tokens: int, family: str | None = None) -> ForwardFlops:
    """Forward FLOPs of one call of a diffusers SD3/SD3.5, FLUX.1 or SANA transformer with `config` (its
    `transformer.config` or the same keys as a dict) on `batch` samples of `image_tokens` latent tokens
    (after patching / packing) and `text_tokens` text tokens."""
    config = _config_dict(config)
    family = family or family_of(config)
    builders = {"sd3": _sd3, "flux": _flux, "sana": _sana}
    if family not in builders:
        raise ValueError(f"unknown DiT family {family!r}; expected one of {sorted(builders)}")
    return builders[family](config, int(batch), int(image_tokens), int(text_tokens))


# ---------------------------------------------------------------------------------------------------------- SiD


def cfg_passes(kappa: float, true_cfg: bool = True) -> int:
    """Batch multiple of a guided call (§4): 2 for true CFG at κ ∉ {0, 1} (one forward over [∅, c]), else 1."""
    return 2 if (true_cfg and kappa not in (0.0, 1.0)) else 1


def sid_iteration_flops(f_generator: float, f_fake: float, f_teacher: float, steps_run: float, passes_fake_loss: int,
                        passes_fake_gen: int, passes_teacher: int) -> dict[str, float]:
    """Analytic FLOPs of one SiD iteration by the rules of the module docstring (forward F of one call at the
    micro-batch for each network; `passes_*` from `cfg_passes`; `steps_run` K', or its mean 2.5 for K = 4).
    Returns the fake-score step, the generator step and their total."""
    k = float(steps_run)
    fake_step = k * f_generator + passes_fake_loss * f_fake * (1 + 2)
    generator_step = (k - 1) * f_generator + f_generator * (1 + 2) + passes_teacher * f_teacher * (1 + 1) \
        + passes_fake_gen * f_fake * (1 + 1)
    return {"fake_step": fake_step, "generator_step": generator_step, "total": fake_step + generator_step}


def counted_iteration_flops(generator: ForwardFlops, fake: ForwardFlops, teacher: ForwardFlops, steps_run: int,
                            passes_fake_loss: int, passes_fake_gen: int, passes_teacher: int,
                            checkpointed: tuple[str, ...] | set[str] = ()) -> dict[str, float]:
    """What FlopCounterMode reads for the same iteration (module docstring): bucket-wise backward costs and the
    recomputed blocks of the networks in `checkpointed` (names teacher, fake_score, generator)."""
    k = int(steps_run)

    def recompute(name: str, f: ForwardFlops) -> float:
        return f.blocks_total if name in checkpointed else 0.0

    fake_step = k * generator.total + passes_fake_loss * (fake.total + fake.trained_backward() + recompute("fake_score", fake))
    generator_step = (k * generator.total + generator.trained_backward() + recompute("generator", generator)
                      + passes_teacher * (teacher.total + teacher.input_backward() + recompute("teacher", teacher))
                      + passes_fake_gen * (fake.total + fake.input_backward() + recompute("fake_score", fake)))
    return {"fake_step": fake_step, "generator_step": generator_step, "total": fake_step + generator_step}


# ---------------------------------------------------------------------------------------------------------- counter


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's convolution_backward count with the weight gradient of a grouped convolution divided by `groups`
    (torch's formula ignores groups there: a depthwise 3x3 conv's weight gradient is counted C times over)."""
    from torch.utils.flop_counter import conv_flop_count, get_shape

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:
        weight_shape = get_shape(out_shape[1])
        if transposed:
            weight = conv_flop_count(t(grad_out_shape), t(x_shape), t(weight_shape), transposed=False)
        else:
            weight = conv_flop_count(t(x_shape), t(grad_out_shape), t(weight_shape), transposed=False)
        flops += weight // max(int(groups), 1)
    return flops


def flop_counter_mode():
    """`torch.utils.flop_counter.FlopCounterMode` (no display) with two fixes: it also counts the CPU fused SDPA
    kernel (torch's registry counts only the CUDA flash / memory-efficient / cuDNN kernels), and a grouped
    convolution's weight gradient is divided by its groups (torch counts SANA's depthwise 3x3 conv's weight gradient
    C = 11200 times over)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten.convolution_backward: _conv_backward_flop}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)
