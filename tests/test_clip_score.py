"""CLIP score (sid_fast.eval.metrics.ClipScore) with a tiny random transformers CLIP built in code and saved to a
temporary directory (no download): loading, the per-sample 100·max(cos, 0) convention against a direct computation,
and the sum/count reduction over 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ranks import RANK_TIMEOUT_S, run_ranks

from sid_fast.eval.metrics import ClipScore

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a small yellow cat", "a big cyan diamond",
           "a magenta square on the left", "a dog", "one little circle in red at the top"]


def _tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sid_fast.models.tiny_components import VOCAB, clip_tokenizer

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """(directory, in-memory model, in-memory processor): the tiny CLIP saved as a transformers directory."""
    model, processor = _tiny_clip()
    directory = tmp_path_factory.mktemp("clip")
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory, model, processor


def _images(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, 32, 32) uint8: smooth random colour fields, so the tiny CLIP sees different images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(coarse, size=32, mode="bilinear") * 255).round().to(torch.uint8)


@torch.no_grad()
def direct_cosines(model, processor, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(image, text) through the model's towers and projections by hand (not get_*_features)."""
    pixels = processor.image_processor(list(images.numpy().transpose(0, 2, 3, 1)), return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    text = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                  attention_mask=tokens["attention_mask"]).pooler_output)
    return torch.nn.functional.cosine_similarity(image, text, dim=-1)


def test_loads_from_a_directory_and_matches_the_direct_score(clip_dir):
    directory, model, processor = clip_dir
    images = _images(len(PROMPTS))
    cosines = direct_cosines(model, processor, images, PROMPTS)
    assert (cosines > 0).any() and (cosines < 0).any()  # both signs: the per-sample clamp matters here
    expected = float((100 * cosines.clamp_min(0)).mean())
    metric = ClipScore(directory)
    torch.testing.assert_close(metric.scores(images, PROMPTS), 100 * cosines.clamp_min(0), atol=1e-4, rtol=1e-5)
    metric.update(images[:3], PROMPTS[:3])
    metric.update(images[3:], PROMPTS[3:])  # accumulated over calls: the mean over all 8, not of the two means
    assert metric.compute() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(float(100 * cosines.mean()), rel=1e-3)  # clamped per sample, not after the mean
    # float images in [-1, 1] (what the in-loop evaluator passes) are quantised like uint8 ones
    floats = images.float() / 127.5 - 1
    metric.update(floats, PROMPTS)
    assert metric.compute() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(FileNotFoundError, match="eval.clip_model"):
        ClipScore(directory / "missing")


def _clip_rank(rank: int, world_size: int, init_file: str, directory: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from sid_fast.errors import lost_rank_error

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
    try:
        images = _images(len(PROMPTS))
        part = slice(0, 3) if rank == 0 else slice(3, None)  # unequal shares: 3 and 5 samples
        metric = ClipScore(directory)
        metric.update(images[part], PROMPTS[part])
        try:
            value = metric.compute()
        except RuntimeError as error:  # a peer that died or hangs is named, not just "timed out"
            raise (lost_rank_error(error) or error) from error
        Path(out, f"rank{rank}.txt").write_text(repr(value))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_value(clip_dir, tmp_path):
    directory, model, processor = clip_dir
    expected = float((100 * direct_cosines(model, processor, _images(len(PROMPTS)), PROMPTS).clamp_min(0)).mean())
    run_ranks(_clip_rank, (2, str(tmp_path / "init"), str(directory), str(tmp_path)), nprocs=2)
    missing = [rank for rank in range(2) if not (tmp_path / f"rank{rank}.txt").is_file()]
    assert not missing, f"rank(s) {missing} exited without a result (interrupted?)"
    values = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert values[0] == values[1] == pytest.approx(expected, rel=1e-5)
