"""Tiny and medium random-weight diffusers components built in code (no download): transformers, VAEs,
text encoders and tokenizers for SD3, FLUX and SANA. They make the `tiny`/`medium` presets of the
diffusers families, the tests that hold our conventions against diffusers' own pipelines, and the benchmarks.

Tokenizers are built offline from a character vocabulary written here (CLIP BPE, T5 unigram, Gemma BPE);
they tokenize like the real ones structurally (special tokens, padding, truncation) but not lexically.
"""

from __future__ import annotations

import string

import torch

CHARS = string.ascii_lowercase + string.digits + ".,'-:!?"
TINY_INSTRUCTION = ["Given a user prompt, describe it:", "User Prompt: "]
"""A short stand-in for SanaPipeline's complex human instruction (the real one is ~300 tokens)."""

# family -> preset -> sizes. `latent`: latent height = width; `text`: encoder width; `seq`: text tokens.
PRESETS: dict[str, dict[str, dict]] = {
    "sd3": {
        "tiny": dict(layers=2, heads=2, head_dim=8, text=32, seq=8, latent=8),
        "sd35-tiny": dict(layers=2, heads=2, head_dim=8, text=32, seq=8, latent=8, dual=(0,), qk_norm="rms_norm"),
        "medium": dict(layers=6, heads=4, head_dim=32, text=64, seq=16, latent=32),
    },
    "flux": {
        "tiny": dict(layers=1, single_layers=1, heads=2, head_dim=8, text=32, seq=8, latent=8, guidance=True),
        "schnell-tiny": dict(layers=1, single_layers=1, heads=2, head_dim=8, text=32, seq=8, latent=8, guidance=False),
        "medium": dict(layers=2, single_layers=4, heads=4, head_dim=32, text=64, seq=16, latent=32, guidance=True),
    },
    "sana": {
        "tiny": dict(layers=2, heads=2, head_dim=8, text=32, seq=8, latent=8, channels=8),
        "sprint-tiny": dict(layers=2, heads=2, head_dim=8, text=32, seq=8, latent=8, channels=8, guidance=True),
        "medium": dict(layers=6, heads=4, head_dim=32, text=64, seq=16, latent=32, channels=32),
    },
}


def preset_spec(family: str, preset: str) -> dict:
    if family not in PRESETS:
        raise ValueError(f"config field teacher.kind: no built-in presets for family {family!r}")
    if preset not in PRESETS[family]:
        raise ValueError(f"config field teacher.preset: unknown {family} preset {preset!r}; known: {sorted(PRESETS[family])}")
    return PRESETS[family][preset]


# ---------------------------------------------------------------- tokenizers (offline, from a vocab in code)


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(ch, -3.0) for ch in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5, "\n": 6}
    for ch in CHARS + CHARS.upper():
        vocab.setdefault(ch, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


VOCAB = 128
"""Vocabulary size of the tiny text encoders (covers every tokenizer above)."""


# ---------------------------------------------------------------- text encoders


def clip_text_encoder(width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_text_encoder(width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB, d_model=width, d_kv=width // 2, d_ff=2 * width, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def gemma_text_encoder(width: int):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2, pad_token_id=0)
    return Gemma2Model(config).eval()


def text_components(family: str, preset: str) -> dict:
    """The tokenizers and text encoders of `family`'s pipeline, named as the pipeline names them."""
    spec = preset_spec(family, preset)
    width = spec["text"]
    if family == "sd3":  # CLIP-L + CLIP-G (half width each, concatenated) + T5 of full width
        return dict(text_encoder=clip_text_encoder(width // 2, True), tokenizer=clip_tokenizer(),
                    text_encoder_2=clip_text_encoder(width // 2, True), tokenizer_2=clip_tokenizer(),
                    text_encoder_3=t5_text_encoder(width), tokenizer_3=t5_tokenizer())
    if family == "flux":
        return dict(text_encoder=clip_text_encoder(width, False), tokenizer=clip_tokenizer(),
                    text_encoder_2=t5_text_encoder(width), tokenizer_2=t5_tokenizer())
    return dict(text_encoder=gemma_text_encoder(width), tokenizer=gemma_tokenizer())


# ---------------------------------------------------------------- transformers and VAEs


def transformer(family: str, preset: str):
    """A random-weight diffusers transformer of the preset's size (seeded by the caller)."""
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

    spec = preset_spec(family, preset)
    heads, head_dim, width = spec["heads"], spec["head_dim"], spec["text"]
    if family == "sd3":
        return SD3Transformer2DModel(sample_size=spec["latent"], patch_size=2, in_channels=16, out_channels=16,
                                     num_layers=spec["layers"], attention_head_dim=head_dim, num_attention_heads=heads,
                                     joint_attention_dim=width, caption_projection_dim=heads * head_dim,
                                     pooled_projection_dim=width, pos_embed_max_size=spec["latent"],
                                     dual_attention_layers=spec.get("dual", ()), qk_norm=spec.get("qk_norm")).eval()
    if family == "flux":
        rope = (head_dim // 4, head_dim // 4, head_dim // 2)
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=spec["layers"],
                                      num_single_layers=spec["single_layers"], attention_head_dim=head_dim,
                                      num_attention_heads=heads, joint_attention_dim=width, pooled_projection_dim=width,
                                      guidance_embeds=spec["guidance"], axes_dims_rope=rope).eval()
    return SanaTransformer2DModel(in_channels=spec["channels"], out_channels=spec["channels"], num_attention_heads=heads,
                                  attention_head_dim=head_dim, num_layers=spec["layers"], num_cross_attention_heads=heads,
                                  cross_attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
                                  caption_channels=width, sample_size=spec["latent"], patch_size=2,
                                  guidance_embeds=spec.get("guidance", False)).eval()


def vae(family: str, preset: str):
    """A tiny VAE with the family's latent channels and a 4x down-sampling (images of 4·latent pixels)."""
    from diffusers import AutoencoderDC, AutoencoderKL

    if family in ("sd3", "flux"):
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
                             latent_channels=16, norm_num_groups=8, shift_factor=0.0609, scaling_factor=1.5035).eval()
    channels = preset_spec(family, preset)["channels"]
    return AutoencoderDC(in_channels=3, latent_channels=channels, attention_head_dim=8,
                         encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                         encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()


PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline"}


def seeded(build, seed: int):
    """Run `build()` under a forked RNG seeded with `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def pipeline(family: str, preset: str = "tiny", seed: int = 0, with_image_parts: bool = True):
    """A complete diffusers pipeline of random components (transformer seeded by `seed`, text encoders by
    seed + 1, VAE by seed + 2); `with_image_parts=False` leaves transformer and VAE out (prompt encoding only)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(), **seeded(lambda: text_components(family, preset), seed + 1))
    parts["transformer"] = seeded(lambda: transformer(family, preset), seed) if with_image_parts else None
    parts["vae"] = seeded(lambda: vae(family, preset), seed + 2) if with_image_parts else None
    return getattr(diffusers, PIPELINES[family])(**parts)


def save_teacher(family: str, directory, preset: str = "tiny", seed: int = 0):
    """Write a tiny teacher as a diffusers directory (what `save_pretrained` writes); returns the pipeline."""
    pipe = pipeline(family, preset, seed)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return pipe
