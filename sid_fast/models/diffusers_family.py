"""The diffusers teacher families `sd3`, `flux` and `sana`: loading a teacher from a local diffusers directory
(or a built-in tiny/medium preset), checking it, wrapping it in its adapter, and the registry builder.

A teacher directory is what `pipeline.save_pretrained` writes (or a downloaded snapshot): `transformer/`
(config.json + safetensors), `vae/`, the text encoders and tokenizers. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sid_fast.errors import InputError
from sid_fast.models.registry import TeacherBundle, register_family

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FamilySpec:
    transformer_class: str
    """diffusers class name expected in transformer/config.json."""
    latent_channels: int
    """Latent channels of the real models (used when the directory has no vae/config.json)."""
    tokens_per_channel: int
    """Transformer in_channels per latent channel (FLUX packs 2x2: 4)."""
    default_latent: int
    """Latent side when neither teacher.resolution nor the transformer's sample_size says otherwise."""


FAMILIES = {
    "sd3": FamilySpec("SD3Transformer2DModel", 16, 1, 128),
    "flux": FamilySpec("FluxTransformer2DModel", 16, 4, 128),
    "sana": FamilySpec("SanaTransformer2DModel", 32, 1, 32),
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a teacher directory is what diffusers' save_pretrained writes "
                                f"(transformer/config.json, vae/config.json, ...)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not a JSON config ({error}): a teacher directory is what diffusers' "
                         f"save_pretrained writes") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object (a diffusers config), found {type(config).__name__}")
    return config


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent cell: 2^(blocks − 1) of an AutoencoderKL (block_out_channels) or AutoencoderDC."""
    blocks = vae_config.get("block_out_channels") or vae_config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else 8


def check_teacher_dir(path: str | Path, family: str) -> dict:
    """Validate `path` for `family` without loading weights; returns {transformer, vae} configs.

    Errors name the file: missing directory or config, wrong transformer class, transformer channels that do
    not match the VAE's latent channels (with the latent shape expected). Without vae/config.json (a generator
    export) the channels are not checked.
    """
    spec = FAMILIES[family]
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher directory {path} does not exist")
    config_file = path / "transformer" / "config.json"
    config = _read_json(config_file)
    found = config.get("_class_name")
    if found != spec.transformer_class:
        raise ValueError(f"{config_file}: _class_name is {found!r}, but a {family} teacher needs {spec.transformer_class!r}")
    vae_file = path / "vae" / "config.json"
    vae = _read_json(vae_file) if vae_file.is_file() else {}
    if not vae:  # a generator export has no VAE: nothing to hold the channels against
        return {"transformer": config, "vae": vae}
    channels = vae.get("latent_channels", spec.latent_channels)
    expected_in = channels * spec.tokens_per_channel
    got_in = config.get("in_channels")
    if got_in != expected_in:
        source = vae_file
        layout = f"(B, h/2·w/2, {expected_in})" if family == "flux" else f"(B, {channels}, h, w)"
        raise ValueError(f"{config_file}: in_channels={got_in} does not match {channels} latent channels of {source}; "
                         f"expected in_channels={expected_in} for latents of shape {layout}")
    return {"transformer": config, "vae": vae}


def make_adapter(family: str, transformer: nn.Module, teacher_config=None) -> nn.Module:
    """Wrap a diffusers transformer in its family adapter, with the family options of `teacher_config`."""
    if family == "sd3":
        from sid_fast.models.sd3 import SD3Adapter

        return SD3Adapter(transformer)
    if family == "flux":
        from sid_fast.models.flux import FluxAdapter

        if teacher_config is None:
            return FluxAdapter(transformer)
        return FluxAdapter(transformer, teacher_config.flux_guidance_mode, teacher_config.flux_guidance)
    if family == "sana":
        from sid_fast.models.sana import SanaAdapter

        return SanaAdapter(transformer, teacher_config.sana_timestep if teacher_config is not None else "auto")
    raise ValueError(f"unknown diffusers family {family!r}; known: {sorted(FAMILIES)}")


def load_transformer(path: str | Path, family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checked transformer of the teacher directory `path`, weights loaded straight into the module."""
    import diffusers

    check_teacher_dir(path, family)
    cls = getattr(diffusers, FAMILIES[family].transformer_class)
    return cls.from_pretrained(str(path), subfolder="transformer", dtype=dtype, local_files_only=True).eval()


def latent_shape(family: str, transformer_config: dict, vae_config: dict, resolution: int = 0,
                 default_side: int | None = None) -> tuple[int, int, int]:
    """(C, h, w) of the unpacked latent at `resolution` pixels (0: `default_side`, the transformer's sample_size
    or the family default)."""
    spec = FAMILIES[family]
    channels = transformer_config["in_channels"] // spec.tokens_per_channel
    if resolution:
        scale = vae_scale_factor(vae_config)
        if resolution % scale:
            raise ValueError(f"config field teacher.resolution: {resolution} is not a multiple of the VAE factor {scale}")
        side = resolution // scale
    else:
        side = default_side or transformer_config.get("sample_size") or spec.default_latent
    if family == "flux" and side % 2:
        raise ValueError(f"config field teacher.resolution: FLUX needs an even latent side, got {side}")
    return (channels, side, side)


def build_diffusers_teacher(config) -> TeacherBundle:
    """Registry builder for kinds sd3/flux/sana: a teacher from `config.path` or the built-in `config.preset`."""
    from sid_fast.encoders import EmbeddingConditions, PromptEncoder, read_prompts
    from sid_fast.models import tiny_components

    family = config.kind
    dtype = DTYPES[config.dtype]
    if config.path is not None:
        configs = check_teacher_dir(config.path, family)
        transformer = load_transformer(config.path, family, dtype)
        if config.prompts is None:  # conditions come from prepared shards (data.shards), checked by the trainer
            teacher = make_adapter(family, transformer, config)
            return TeacherBundle(teacher, None, None, latent_shape(family, configs["transformer"], configs["vae"],
                                                                   config.resolution, None))
        prompts = read_prompts(config.prompts)
        encoder = PromptEncoder.from_pretrained(config.path, family, max_sequence_length=config.max_sequence_length)
        default_side = None
    elif config.preset is not None:
        spec = tiny_components.preset_spec(family, config.preset)
        transformer = tiny_components.seeded(lambda: tiny_components.transformer(family, config.preset), 0)
        if dtype != torch.float32:
            transformer = transformer.to(dtype)
        configs = {"transformer": dict(transformer.config), "vae": dict(tiny_components.vae(family, config.preset).config)}
        prompts = read_prompts(config.prompts) if config.prompts else [
            "a red circle", "a blue square", "two green triangles", "a small yellow cat"]
        instruction = tiny_components.TINY_INSTRUCTION if family == "sana" else None
        default_side = spec["latent"]
        encoder = PromptEncoder(tiny_components.pipeline(family, config.preset, with_image_parts=False), family,
                                config.max_sequence_length or spec["seq"], instruction)
    else:
        raise ValueError(f"config field teacher.path: a {family} teacher needs teacher.path (a local diffusers "
                         f"directory) or teacher.preset (one of {sorted(tiny_components.PRESETS[family])})")
    bank, uncond = encoder.encode_all(prompts), encoder.unconditional()
    encoder.release()
    teacher = make_adapter(family, transformer, config)
    shape = latent_shape(family, configs["transformer"], configs["vae"], config.resolution, default_side)
    return TeacherBundle(teacher, None, EmbeddingConditions(bank, uncond, prompts), shape)


for _family in FAMILIES:
    register_family(_family, build_diffusers_teacher)
