"""The ShapesWorld teacher family `shapes`: a small diffusers `SD3Transformer2DModel` in pixel space (3 channels,
32×32, no VAE) conditioned on MiniLM text states, wrapped by the SD3 adapter (§1: timestep 1000·t, true CFG).

  embeds (B, L, 384) -> encoder_hidden_states (joint_attention_dim 384); pooled (B, 384) -> pooled_projections.

Weights live in one safetensors file whose metadata holds the transformer config (`save_shapes_transformer`).
Without teacher.path and teacher.preset the shipped file `sid_fast/assets/shapes/teacher.safetensors` is loaded
(made by `sid-fast pretrain`, see docs/shapes.md); teacher.preset=tiny|small|base gives a seeded random init.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sid_fast.models.registry import TeacherBundle, register_family

SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "shapes" / "teacher.safetensors"
"""The teacher the project ships (half precision, ≤ 20 MB)."""
_COMMON = dict(sample_size=32, in_channels=3, out_channels=3, joint_attention_dim=384, pooled_projection_dim=384)
PRESETS: dict[str, dict] = {
    "tiny": dict(patch_size=4, num_layers=1, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32),
    "small": dict(patch_size=2, num_layers=4, attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128),
    "base": dict(patch_size=4, num_layers=4, attention_head_dim=64, num_attention_heads=4, caption_projection_dim=256),
}
"""Architectures: tiny (0.06M, tests), small (2.4M, patch 2: 256 tokens), base (9.2M, patch 4: 64 tokens)."""


def shapes_transformer(preset: str = "base", seed: int = 0, resolution: int = 32) -> nn.Module:
    """A randomly initialised (seeded) ShapesWorld SD3 transformer of architecture `preset`."""
    from diffusers import SD3Transformer2DModel

    if preset not in PRESETS:
        raise ValueError(f"config field teacher.preset: unknown shapes architecture {preset!r}; "
                         f"known: {sorted(PRESETS)}")
    arch = PRESETS[preset]
    if resolution % arch["patch_size"]:
        raise ValueError(f"config field teacher.resolution: {resolution} is not a multiple of "
                         f"patch {arch['patch_size']}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**{**_COMMON, "sample_size": resolution}, **arch,
                                      pos_embed_max_size=resolution // arch["patch_size"])
    return model.eval()


def save_shapes_transformer(transformer: nn.Module, path: str | Path, dtype: torch.dtype = torch.float16,
                            card: dict | None = None) -> Path:
    """Write `transformer`'s weights in `dtype` to one safetensors file, its config (and `card`) as metadata;
    written to a temporary name and renamed, so a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(dict(transformer.config)), "card": json.dumps(card or {})}
    tensors = {name: value.detach().to("cpu", dtype).contiguous() for name, value in transformer.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_shapes_transformer(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformer saved by `save_shapes_transformer` at `path`, in `dtype`; errors name the file."""
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ShapesWorld teacher weights {path} do not exist")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path}: no `config` in the safetensors metadata; write it with save_shapes_transformer")
    config = {k: v for k, v in json.loads(metadata["config"]).items() if not k.startswith("_")}
    model = SD3Transformer2DModel.from_config(config)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the config in its metadata (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def read_card(path: str | Path) -> dict:
    """The model card stored in a shapes safetensors file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return json.loads((handle.metadata() or {}).get("card", "{}"))


def resolve_transformer(config) -> nn.Module:
    """teacher.path (a safetensors file) > teacher.preset (random init) > the shipped teacher."""
    from sid_fast.models.diffusers_family import DTYPES

    dtype = DTYPES[config.dtype]
    if config.path is not None:
        return load_shapes_transformer(config.path, dtype)
    if config.preset is not None:
        model = shapes_transformer(config.preset, resolution=config.resolution or 32)
        return model if dtype == torch.float32 else model.to(dtype)
    if not SHIPPED_TEACHER.is_file():
        raise FileNotFoundError(
            f"the shipped ShapesWorld teacher {SHIPPED_TEACHER} is missing: make it with `sid-fast pretrain` "
            f"(docs/shapes.md), or give teacher.path=FILE.safetensors, or teacher.preset=tiny for a random one")
    return load_shapes_transformer(SHIPPED_TEACHER, dtype)


def build_shapes_teacher(config) -> TeacherBundle:
    """Registry builder for kind `shapes`; conditions from teacher.prompts (MiniLM-encoded) or prompt shards."""
    from sid_fast.encoders import EmbeddingConditions, read_prompts
    from sid_fast.models.sd3 import SD3Adapter

    transformer = resolve_transformer(config)
    side = int(transformer.config.sample_size)
    if config.resolution and config.resolution != side:
        raise ValueError(f"config field teacher.resolution: {config.resolution} differs from the teacher's {side} px")
    conditions = None
    if config.prompts is not None:
        from sid_fast.encoders.minilm import MiniLMEncoder

        encoder = MiniLMEncoder(max_length=config.max_sequence_length or 20)
        prompts = read_prompts(config.prompts)
        conditions = EmbeddingConditions(encoder.encode_all(prompts), encoder.unconditional(), prompts)
        encoder.release()
    return TeacherBundle(SD3Adapter(transformer), None, conditions, (int(transformer.config.in_channels), side, side),
                         real_data=lambda conditions, seed: _rendered_scenes(conditions, side, seed))


def _rendered_scenes(conditions, resolution: int, seed: int):
    """SiD²ₐ's real data on ShapesWorld: scenes rendered for the prompt shards' captions (pixel space)."""
    from sid_fast.shapes.real import ShapesRealData

    return ShapesRealData.from_conditions(conditions, resolution=resolution, seed=seed)


register_family("shapes", build_shapes_teacher)
