"""`sid-fast pretrain` of the ShapesWorld teacher (tiny config, a handful of steps), the `shapes` teacher family,
the feature network with its Fréchet distance, and caption grids."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from sid_fast.config import TeacherConfig
from sid_fast.models.registry import build_teacher
from sid_fast.shapes.pretrain import PretrainConfig, pretrain

TINY = dict(preset="tiny", batch_size=4, encoder="tiny", max_captions=40, warmup_steps=2, log_every=2)


def test_pretrain_writes_a_half_precision_teacher_log_and_card(tmp_path):
    from sid_fast.cli import main

    out = tmp_path / "run"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["pretrain", "--out-dir", str(out), "--steps", "4", "--checkpoint-every", "2", "--no-progress",
                 "--eval-prompts", "3", "--eval-steps", "1,2", *options]) == 0
    weights = load_file(str(out / "teacher.safetensors"))
    assert weights and all(value.dtype == torch.float16 for value in weights.values())
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4] and all(line["loss"] > 0 for line in lines)
    card = (out / "MODEL_CARD.md").read_text()
    assert card.count('"preset": "tiny"') == 1
    assert "| teacher 2-step cfg 4.0 | 2obj | 0.000 [0.000, 0.561] (n=3) |" in card  # random weights: none right
    from sid_fast.models.shapes import read_card

    assert len(read_card(out / "teacher.safetensors")["scores"]) == 4
    assert (out / "captions" / "heldout-1obj.txt").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]

    # the written file is a `shapes` teacher: the registry builds it and it predicts a velocity of x_t's shape
    bundle = build_teacher(TeacherConfig(kind="shapes", path=str(out / "teacher.safetensors")))
    assert bundle.sample_shape == (3, 32, 32) and bundle.conditions is None  # prompts come from shards
    from sid_fast.models.protocol import Conditioning

    velocity = bundle.teacher(torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.9]),
                    Conditioning(embeds=torch.randn(2, 20, 384), pooled=torch.randn(2, 384)))
    assert velocity.shape == (2, 3, 32, 32) and torch.isfinite(velocity).all()

    from sid_fast.shapes.evaluate import generator_samples

    cond = Conditioning(embeds=torch.randn(3, 20, 384), pooled=torch.randn(3, 384))
    samples = generator_samples(bundle.teacher, cond, num_steps=2, seed=5, batch_size=2)
    assert samples.shape == (3, 3, 32, 32) and samples.abs().max() <= 1
    assert torch.equal(samples, generator_samples(bundle.teacher, cond, num_steps=2, seed=5, batch_size=2))


def test_resume_continues_the_same_run_and_refuses_other_options(tmp_path):
    straight = pretrain(PretrainConfig(out_dir=str(tmp_path / "a"), steps=6, checkpoint_every=3, **TINY),
                        progress=False)
    pretrain(PretrainConfig(out_dir=str(tmp_path / "b"), steps=3, checkpoint_every=3, **TINY), progress=False)
    resumed = pretrain(PretrainConfig(out_dir=str(tmp_path / "b"), steps=6, checkpoint_every=3, **TINY), progress=False)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000006" / "model.safetensors"))
    untrained = load_file(str(tmp_path / "b" / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert any(not torch.equal(first[k], untrained[k]) for k in first)  # training moved the weights
    with pytest.raises(ValueError, match="cond_dropout"):
        pretrain(PretrainConfig(out_dir=str(tmp_path / "b"), steps=7, cond_dropout=0.2,
                                **TINY), progress=False)


def test_shapes_family_random_init_and_missing_shipped_file(tmp_path, monkeypatch):
    import sid_fast.models.shapes as shapes

    bundle = build_teacher(TeacherConfig(kind="shapes", preset="tiny"))
    assert bundle.sample_shape == (3, 32, 32)
    assert sum(p.numel() for p in bundle.teacher.parameters()) < 100_000
    monkeypatch.setattr(shapes, "SHIPPED_TEACHER", tmp_path / "teacher.safetensors")
    with pytest.raises(FileNotFoundError, match="teacher.safetensors is missing"):
        build_teacher(TeacherConfig(kind="shapes"))
    with pytest.raises(ValueError, match="teacher.preset"):
        build_teacher(TeacherConfig(kind="shapes", preset="huge"))
    with pytest.raises(ValueError, match="pretrain option lr"):
        PretrainConfig(lr=0)


def test_feature_net_trains_and_frechet_distance_separates(tmp_path):
    from sid_fast.shapes.features import (
        features,
        frechet_interval,
        load_feature_net,
        random_scenes,
        save_feature_net,
        train_feature_net,
    )
    from sid_fast.shapes.world import render_batch

    net, losses = train_feature_net(steps=12, batch_size=16, seed=0)
    assert sum(losses[-3:]) / 3 < losses[0]
    real = render_batch(random_scenes(120, random.Random(1)))
    again = render_batch(random_scenes(120, random.Random(2)))
    noise = torch.rand(120, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same, (low, high) = frechet_interval(features(net, real), features(net, again), chunks=3)
    far, (far_low, _) = frechet_interval(features(net, real), features(net, noise), chunks=3)
    assert low < same < high and far_low > high and far > 10 * same
    pooled = features(net, real, layer="pooled")
    assert pooled.shape == (120, 128) and frechet_interval(pooled, features(net, noise, layer="pooled"))[0] > 0
    with pytest.raises(ValueError, match="too few"):
        frechet_interval(features(net, real[:3]), features(net, noise[:3]), chunks=2)
    path = save_feature_net(net, tmp_path / "features.safetensors", {"steps": 12})
    assert torch.equal(features(load_feature_net(path), real), features(net, real))


def test_caption_grid_png(tmp_path):
    from PIL import Image

    from sid_fast.shapes.grid import caption_grid

    images = torch.rand(5, 3, 32, 32) * 2 - 1
    path = caption_grid(images, [f"caption {i}" for i in range(5)], tmp_path / "grid.png", columns=3,
                        verdicts=[True, False, True, True, False], title="t")
    with Image.open(path) as picture:
        assert picture.width == 3 * (96 + 12) and picture.height > 2 * 96
    with pytest.raises(ValueError, match="5 images, 4 captions"):
        caption_grid(images, ["x"] * 4, tmp_path / "bad.png")


def test_device_option_and_split_join_of_a_teacher_for_the_gpu_lease(tmp_path, monkeypatch):
    """The GPU scripts' pieces that run without a GPU: the device option is checked, a teacher is split into
    parts (a lent machine returns files of at most 16 MiB) and joined back bit for bit, and a wrong
    $SID_FAST_MINILM is named."""
    import importlib.util
    from pathlib import Path

    from safetensors import safe_open

    with pytest.raises(ValueError, match="pretrain option device"):
        PretrainConfig(device="warp-drive")
    path = pretrain(PretrainConfig(out_dir=str(tmp_path / "run"), steps=1, device="cpu", **TINY), progress=False)
    script = Path(__file__).resolve().parents[1] / "launchers" / "shapes_teacher_gpu.py"
    spec = importlib.util.spec_from_file_location("shapes_teacher_gpu", script)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    parts = gpu.split_teacher(path, tmp_path, "teacher-1")
    sizes = [p.stat().st_size for p in parts]
    assert len(parts) == 2 and max(sizes) < 0.75 * path.stat().st_size
    joined = gpu.join_teacher(parts, tmp_path / "joined" / "teacher.safetensors")
    a, b = load_file(str(path)), load_file(str(joined))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(path), "pt") as x, safe_open(str(joined), "pt") as y:
        assert x.metadata() == y.metadata()
    with pytest.raises(ValueError, match="repeats tensors"):
        gpu.join_teacher([parts[0], parts[0]], tmp_path / "bad.safetensors")

    from sid_fast.encoders.minilm import model_path

    monkeypatch.setenv("SID_FAST_MINILM", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="SID_FAST_MINILM"):
        model_path()
