"""What `prepare` needs from a teacher's encoders, and image preprocessing.

`sid_fast.encoders` (per-family prompt encoding through the diffusers pipelines) provides objects that satisfy
these protocols; the data package depends only on the protocols, so tests run with tiny encoders built in code.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sid_fast.errors import InputError
from sid_fast.models.protocol import Conditioning


@runtime_checkable
class PromptEncoder(Protocol):
    """Prompts -> text conditioning of the teacher (embeds (B, L, D), pooled (B, P), mask (B, L) as the family has)."""

    teacher_id: str

    def encode(self, prompts: list[str]) -> Conditioning: ...

    def unconditional(self) -> Conditioning:
        """The encoded empty prompt "" (§1), batch 1."""


@runtime_checkable
class LatentEncoder(Protocol):
    """Images (B, 3, R, R) in [-1, 1] -> teacher latents (B, C, h, w) in the family's convention (§1)."""

    teacher_id: str
    resolution: int

    def encode(self, images: Tensor) -> Tensor: ...


class VAELatentEncoder:
    """A diffusers VAE as a LatentEncoder: z = (E(x) − shift)·scale (§1 latent row), E(x) the posterior mode.

    Works with AutoencoderKL (SD3, FLUX: 16 ch, H/8; shift/scale from the VAE config) and AutoencoderDC (SANA:
    32 ch, H/32; scale only). FLUX's 2×2 packing is the teacher adapter's job, so latents are stored unpacked.
    """

    def __init__(self, vae: nn.Module, teacher_id: str, resolution: int, shift: float | None = None,
                 scale: float | None = None, device: str | torch.device = "cpu"):
        self.vae = vae.eval().requires_grad_(False).to(device)
        self.teacher_id = teacher_id
        self.resolution = resolution
        config = getattr(vae, "config", {})
        self.shift = float(shift if shift is not None else (getattr(config, "shift_factor", None) or 0.0))
        self.scale = float(scale if scale is not None else (getattr(config, "scaling_factor", None) or 1.0))
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images: (B, 3, R, R) in [-1, 1] -> (B, C, h, w) float32."""
        parameter = next(self.vae.parameters())
        output = self.vae.encode(images.to(self.device, parameter.dtype))
        posterior = getattr(output, "latent_dist", None)
        latents = posterior.mode() if posterior is not None else output.latent
        return ((latents.float() - self.shift) * self.scale).cpu()


def load_image(data: bytes, resolution: int) -> Tensor:
    """Image bytes -> (3, R, R) float32 in [-1, 1]: RGB, centre crop to square, bicubic resize.

    Raises ValueError (with PIL's reason) when the bytes are not a decodable image.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.fit(image.convert("RGB"), (resolution, resolution), method=Image.Resampling.BICUBIC)
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"undecodable image ({type(error).__name__}: {error})") from None
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, R, R)


FAMILY_PARTS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"),
                "flux": ("text_encoder", "text_encoder_2", "vae"), "sana": ("text_encoder", "vae")}
FAMILY_VAES = {"sd3": "AutoencoderKL", "flux": "AutoencoderKL", "sana": "AutoencoderDC"}


def teacher_id(kind: str, path: str | Path | None = None, max_sequence_length: int = 0, seed: int = 0) -> str:
    """Identity of a teacher's encoders, stored in the manifest and checked by the trainer.

    `<family>:<fingerprint>:L<tokens>`, the fingerprint a sha256 over the text encoders' and VAE's config.json and
    weight-file names and sizes (not the path, so shards move between machines; teachers sharing their encoders,
    e.g. SD3.5 Medium and Large, share shards). `tiny`: the tiny encoder's own id.
    """
    if kind == "tiny":
        from sid_fast.data.tiny import TinyPromptEncoder

        return TinyPromptEncoder(seed=seed).teacher_id
    if kind == "shapes":  # the ShapesWorld MiniLM encoder ships with its package: no teacher directory involved
        return f"shapes:all-minilm-l6-v2:L{max_sequence_length or 20}"
    if kind not in FAMILY_PARTS:
        raise InputError(f"encoder {kind!r}: unknown family; known: {sorted(FAMILY_PARTS) + ['shapes', 'tiny']}")
    if path is None or not Path(path).is_dir():
        raise InputError(f"encoder {kind!r} needs the teacher's local diffusers directory, got {path!r}")
    digest = hashlib.sha256()
    for part in FAMILY_PARTS[kind]:
        config = Path(path, part, "config.json")
        if not config.is_file():
            raise InputError(f"{config} is missing: a {kind} teacher directory needs {FAMILY_PARTS[kind]}")
        digest.update(part.encode() + config.read_bytes())
        for weights in sorted(Path(path, part).glob("*.safetensors")) + sorted(Path(path, part).glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{kind}:{digest.hexdigest()[:16]}:L{max_sequence_length or 'default'}"


class IdentifiedPromptEncoder:
    """Gives a `sid_fast.encoders.PromptEncoder` (or any encode/unconditional object) the `teacher_id` of the protocol."""

    def __init__(self, encoder, teacher_id: str):
        self.encoder, self.teacher_id = encoder, teacher_id

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.encoder.encode(prompts)

    def unconditional(self) -> Conditioning:
        return self.encoder.unconditional()


def build_encoders(kind: str, path: str | None = None, device: str = "cpu", resolution: int | None = None,
                   seed: int = 0, max_sequence_length: int = 0, dtype: torch.dtype = torch.float32
                   ) -> tuple[PromptEncoder, LatentEncoder | None]:
    """The prompt encoder (and, with `resolution`, the latent encoder) of teacher family `kind`.

    `tiny`: the in-code tiny encoders (tests, benchmarks, CPU demos). sd3/flux/sana: the pipeline's own text
    encoders (`sid_fast.encoders.PromptEncoder`) and VAE, loaded from the local directory `path`.
    """
    if kind == "tiny":
        from sid_fast.data.tiny import TinyPromptEncoder, tiny_vae

        prompt_encoder = TinyPromptEncoder(seed=seed)
        latent_encoder = None
        if resolution is not None:
            latent_encoder = VAELatentEncoder(tiny_vae(seed), prompt_encoder.teacher_id, resolution, device=device)
        return prompt_encoder, latent_encoder
    if kind == "shapes":  # ShapesWorld: MiniLM text states; the teacher works in pixel space (no latent encoder)
        from sid_fast.encoders.minilm import MiniLMEncoder

        if resolution is not None:
            raise InputError("encoder 'shapes' works in pixel space: render ShapesWorld images instead of preparing latents")
        return MiniLMEncoder(max_length=max_sequence_length or 20, device=device), None
    identity = teacher_id(kind, path, max_sequence_length)
    from sid_fast.encoders import PromptEncoder as PipelinePromptEncoder

    encoder = PipelinePromptEncoder.from_pretrained(path, kind, dtype=dtype, device=device, max_sequence_length=max_sequence_length)
    latent_encoder = None
    if resolution is not None:
        import diffusers

        vae = getattr(diffusers, FAMILY_VAES[kind]).from_pretrained(str(Path(path, "vae")), dtype=dtype, local_files_only=True)
        latent_encoder = VAELatentEncoder(vae, identity, resolution, device=device)
    return IdentifiedPromptEncoder(encoder, identity), latent_encoder
