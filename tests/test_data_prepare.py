"""`prepare` (sid_fast/data/prepare.py): inputs, bit-exact embeddings, resume, images through a tiny VAE, the CLI."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from sid_fast.cli import main
from sid_fast.data import ShardManifest, ShardStream, VAELatentEncoder, load_image, prepare_images, prepare_prompts
from sid_fast.data.prepare import STATE
from sid_fast.data.tiny import TinyPromptEncoder, tiny_vae
from sid_fast.models.protocol import Conditioning

PROMPTS = [f"prompt {i} " + " ".join(random.Random(i).choice("red cat blue dog sky tree big".split()) for _ in range(i % 7 + 1))
           for i in range(23)]


class RecordingEncoder:
    """Wraps an encoder and records what it produced per prompt; optionally fails after `fail_after` batches."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.teacher_id, self.fail_after = inner, inner.teacher_id, fail_after
        self.outputs: dict[str, dict[str, torch.Tensor]] = {}
        self.batches = 0

    def encode(self, prompts: list[str]) -> Conditioning:
        if self.fail_after is not None and self.batches == self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.batches += 1
        cond = self.inner.encode(prompts)
        for i, prompt in enumerate(prompts):
            self.outputs[prompt] = {name: value[i].clone() for name, value in cond.tensors().items()}
        return cond

    def unconditional(self) -> Conditioning:
        return self.inner.unconditional()


def read_all(directory: Path) -> dict[str, dict]:
    return {s["prompt"]: s for s in ShardStream(directory, shuffle_buffer=0).iter_epoch()}


def write_inputs(tmp_path: Path) -> dict[str, Path]:
    txt = tmp_path / "p.txt"
    txt.write_text("\n".join(PROMPTS[:10] + ["   "] + PROMPTS[10:]) + "\n")  # one blank line: skipped and counted
    jsonl = tmp_path / "p.jsonl"
    lines = [json.dumps({"caption": p}) for p in PROMPTS]
    jsonl.write_text("\n".join(lines[:5] + ["{not json"] + lines[5:] + [json.dumps({"other": 1})]) + "\n")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": PROMPTS + [None], "id": list(range(len(PROMPTS) + 1))}), parquet)
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


@pytest.mark.parametrize("kind,bad", [("txt", 1), ("jsonl", 2), ("parquet", 1)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prompt_shards_hold_exactly_what_the_encoder_produced(tmp_path, kind, bad, dtype):
    source = write_inputs(tmp_path)[kind]
    encoder = RecordingEncoder(TinyPromptEncoder(seed=1))
    manifest = prepare_prompts(source, tmp_path / "out", encoder, batch_size=4, samples_per_shard=6, dtype=dtype, progress=False)
    assert manifest.count == len(PROMPTS) and manifest.skipped == bad and len(manifest.shards) == 4
    assert manifest.teacher_id == encoder.teacher_id and manifest.fields["embeds"]["dtype"] == dtype
    samples = read_all(tmp_path / "out")
    assert sorted(samples) == sorted(PROMPTS)
    store = getattr(torch, dtype)
    for prompt, produced in encoder.outputs.items():
        for name, value in produced.items():
            expected = value.to(store) if value.is_floating_point() else value
            assert samples[prompt][name].dtype == expected.dtype
            assert torch.equal(samples[prompt][name], expected), (prompt, name)  # bit-exact in the stored dtype
    assert not (tmp_path / "out" / STATE).exists()


def test_interrupted_prepare_resumes_to_identical_shards(tmp_path):
    source = write_inputs(tmp_path)["txt"]
    options = dict(batch_size=4, samples_per_shard=5, progress=False)
    reference = prepare_prompts(source, tmp_path / "ref", TinyPromptEncoder(), **options)
    with pytest.raises(KeyboardInterrupt):  # dies in the 4th batch: shards 0-1 finished (prompts 0-9), shard 2 partial
        prepare_prompts(source, tmp_path / "out", RecordingEncoder(TinyPromptEncoder(), fail_after=3), **options)
    state = json.loads((tmp_path / "out" / STATE).read_text())
    assert [s["name"] for s in state["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert (tmp_path / "out" / "shard-000002.tar.tmp").exists()
    kept = [(tmp_path / "out" / s["name"]).stat().st_mtime_ns for s in state["shards"]]
    resumed_encoder = RecordingEncoder(TinyPromptEncoder())
    resumed = prepare_prompts(source, tmp_path / "out", resumed_encoder, **options)
    assert set(resumed_encoder.outputs) == set(PROMPTS[10:])  # finished shards were not re-encoded
    assert [(tmp_path / "out" / s["name"]).stat().st_mtime_ns for s in state["shards"]] == kept
    assert resumed.shards == reference.shards and resumed.skipped == reference.skipped == 1  # byte-identical tars
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(ValueError, match="already a finished shard directory"):
        prepare_prompts(source, tmp_path / "out", TinyPromptEncoder(), **options)


def test_resume_with_other_settings_is_refused(tmp_path):
    source = write_inputs(tmp_path)["txt"]
    with pytest.raises(KeyboardInterrupt):
        prepare_prompts(source, tmp_path / "out", RecordingEncoder(TinyPromptEncoder(), fail_after=2),
                        batch_size=4, samples_per_shard=5, progress=False)
    with pytest.raises(ValueError, match="teacher_id"):
        prepare_prompts(source, tmp_path / "out", TinyPromptEncoder(seed=9), batch_size=4, samples_per_shard=5, progress=False)


def png_bytes(seed: int, size=(20, 14)) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def latent_encoder():
    return VAELatentEncoder(tiny_vae(seed=0), TinyPromptEncoder().teacher_id, resolution=8)


def make_image_inputs(root: Path, kind: str, n: int) -> Path:
    captions = [f"image {i} of a red cat" for i in range(n)]
    if kind == "folder":
        root.mkdir()
        for i in range(n):
            (root / f"img{i:02d}.png").write_bytes(png_bytes(i))
            (root / f"img{i:02d}.txt").write_text(captions[i])
        (root / "img98.png").write_bytes(png_bytes(98))  # no caption beside it
        (root / "img99.png").write_bytes(b"not an image")
        (root / "img99.txt").write_text("broken")
        return root
    if kind == "parquet":
        path = root.with_suffix(".parquet")
        pq.write_table(pa.table({"image": [{"bytes": png_bytes(i), "path": None} for i in range(n)] + [{"bytes": b"junk", "path": None}],
                                 "caption": captions + ["junk"]}), path)
        return path
    root.mkdir()
    with TarWriter(str(root / "input-0.tar")) as writer:
        for i in range(n):
            writer.write({"__key__": f"s{i:03d}", "png": png_bytes(i), "json": json.dumps({"caption": captions[i]})})
        writer.write({"__key__": "nocaption", "png": png_bytes(7)})
    return root


@pytest.mark.parametrize("kind,bad", [("folder", 2), ("parquet", 1), ("tars", 1)])
def test_image_preparation_with_a_tiny_vae(tmp_path, latent_encoder, kind, bad):
    source = make_image_inputs(tmp_path / "in", kind, 5)
    prompt_encoder = TinyPromptEncoder()
    manifest = prepare_images(source, tmp_path / "out", prompt_encoder, latent_encoder, batch_size=2, samples_per_shard=2,
                              progress=False)
    assert manifest.count == 5 and manifest.skipped == bad and manifest.kind == "images"
    assert manifest.fields["latents"] == {"shape": [4, 4, 4], "dtype": "float32"}
    samples = read_all(tmp_path / "out")
    for i in range(5):
        sample = samples[f"image {i} of a red cat"]
        expected = latent_encoder.encode(load_image(png_bytes(i), 8)[None])[0]
        assert torch.allclose(sample["latents"], expected, atol=1e-5)  # batch-composition rounding only
        text = prompt_encoder.encode([sample["prompt"]])
        assert torch.allclose(sample["embeds"].float(), text.embeds[0].to(torch.bfloat16).float(), atol=1e-2)


def test_image_loading_crops_the_centre():
    image = torch.zeros(10, 30, 3, dtype=torch.uint8)
    image[:, 10:20] = 255  # white centre square, black sides
    buffer = io.BytesIO()
    Image.fromarray(image.numpy()).save(buffer, format="PNG")
    pixels = load_image(buffer.getvalue(), 10)
    assert pixels.shape == (3, 10, 10) and pixels.min() > 0.9
    with pytest.raises(ValueError, match="undecodable image"):
        load_image(b"junk", 10)


def test_cli_prepare_prompts_and_images(tmp_path, capsys):
    source = write_inputs(tmp_path)["jsonl"]
    assert main(["prepare", "prompts", str(source), "--out", str(tmp_path / "p"), "--samples-per-shard", "10", "--no-progress"]) == 0
    assert ShardManifest.load(tmp_path / "p").count == len(PROMPTS)
    assert f"{len(PROMPTS)} samples in 3 shards" in capsys.readouterr().out
    assert main(["prepare", "prompts", str(source), "--out", str(tmp_path / "p"), "--no-progress"]) == 2  # finished: refused
    assert "already a finished shard directory" in capsys.readouterr().err
    assert main(["prepare", "verify", str(tmp_path / "p")]) == 0 and "OK" in capsys.readouterr().out
    shard = tmp_path / "p" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])
    assert main(["prepare", "verify", str(tmp_path / "p")]) == 1
    assert f"{shard}: " in capsys.readouterr().out
    images = make_image_inputs(tmp_path / "imgs", "folder", 3)
    assert main(["prepare", "images", str(images), "--out", str(tmp_path / "i"), "--resolution", "8", "--no-progress"]) == 0
    assert ShardManifest.load(tmp_path / "i").fields["latents"]["shape"] == [4, 4, 4]


def test_a_tiny_sd3_teacher_directory_end_to_end(tmp_path, capsys):
    """`--encoder sd3 --teacher-path DIR`: the pipeline's own text encoders and VAE; the id survives moving the directory."""
    import shutil

    from sid_fast.data import ShardConditions, ShardError, teacher_id
    from sid_fast.models.tiny_components import save_teacher

    save_teacher("sd3", tmp_path / "sd3")
    source = write_inputs(tmp_path)["txt"]
    assert main(["prepare", "prompts", str(source), "--out", str(tmp_path / "p"), "--encoder", "sd3",
                 "--teacher-path", str(tmp_path / "sd3"), "--samples-per-shard", "12", "--no-progress"]) == 0
    images = make_image_inputs(tmp_path / "imgs", "folder", 2)
    assert main(["prepare", "images", str(images), "--out", str(tmp_path / "i"), "--encoder", "sd3", "--teacher-path",
                 str(tmp_path / "sd3"), "--resolution", "16", "--samples-per-shard", "1", "--no-progress"]) == 0
    shutil.move(tmp_path / "sd3", tmp_path / "moved")
    identity = teacher_id("sd3", tmp_path / "moved")
    conditions = ShardConditions(tmp_path / "p", teacher_id=identity, num_workers=0)
    cond = conditions.sample(2)
    assert cond.embeds.shape[0] == 2 and cond.pooled is not None and cond.mask is None  # SD3 has pooled, no mask
    latents, _ = ShardConditions(tmp_path / "i", teacher_id=identity, num_workers=0).sample_with_latents(2)
    vae_config = json.loads((tmp_path / "moved" / "vae" / "config.json").read_text())
    side = 16 // 2 ** (len(vae_config["block_out_channels"]) - 1)
    assert latents.shape[1:] == (vae_config["latent_channels"], side, side)
    with pytest.raises(ShardError, match=f"prepared for teacher 'tiny-d32-l16-v1024-seed0'.*teacher is '{identity}'"):
        prepare_prompts(source, tmp_path / "t", TinyPromptEncoder(), progress=False)
        ShardConditions(tmp_path / "t", teacher_id=identity)
