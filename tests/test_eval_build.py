"""In-loop evaluation built from the config (sid_fast.eval.build): `sid-fast distill` / `sid_fast.distill` with
eval.every_images > 0, every metric's requirements, the fixed prompt set, the ShapesWorld metric."""

from __future__ import annotations

import json

import pytest
import torch

from sid_fast.cli import main
from sid_fast.config import load_config
from sid_fast.encoders import EmbeddingConditions
from sid_fast.eval.build import build_evaluator, eval_prompt_set
from sid_fast.eval.metrics import (
    FeatureStats,
    FrechetMetric,
    ShapesScore,
    fd_features,
    frechet_distance,
    frechet_distance_of,
    load_reference,
    write_reference,
)
from sid_fast.models.protocol import Conditioning

CAPTIONS = ["a red circle", "a big blue square on the left", "a green triangle left of a yellow circle"]


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _expected_best(evaluations: list[dict], key: str, keep: int, higher: bool) -> list[str]:
    """Files the retention rule keeps: a result enters only when strictly better than the worst kept (ties: earlier)."""
    kept: list[dict] = []
    for row in evaluations:
        value = row[key]
        if len(kept) < keep or (value > kept[-1][key] if higher else value < kept[-1][key]):
            kept = sorted(kept + [row], key=lambda r: -r[key] if higher else r[key])[:keep]
    return sorted(f"step-{r['step']:08d}.safetensors" for r in kept)


def _shapes_run(tmp_path, name: str, *extra: str):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / name
    assert main(["distill", "--teacher.kind=shapes", "--teacher.preset=tiny", f"--teacher.prompts={prompts}",
                 "--train.iterations=4", "--train.batch_size=2", f"--train.out_dir={out}", "--train.progress=false",
                 "--train.log_every=1", "--method.num_steps=2", "--health.tensorboard=false",
                 "--eval.every_images=4", "--eval.num_samples=4", "--eval.keep_best=2", "--eval.grid=4", *extra]) == 0
    return out


def test_distill_with_the_shapes_metric_writes_grids_log_and_best(tmp_path):
    from sid_fast.shapes.features import FeatureNet, save_feature_net

    torch.manual_seed(3)
    net = save_feature_net(FeatureNet(width=4), tmp_path / "features.safetensors")
    out = _shapes_run(tmp_path, "shapes", "--eval.metric=shapes", f"--eval.shapes_features={net}")
    evaluations = [row for row in _log(out) if "eval_shapes" in row]
    # 4 images per iteration (fake + generator step, batch 2): one evaluation per iteration
    assert [row["step"] for row in evaluations] == [1, 2, 3, 4]
    for row in evaluations:
        assert 0.0 <= row["eval_shapes"] <= 1.0
        assert row["eval_shapes_ci_low"] <= row["eval_shapes"] <= row["eval_shapes_ci_high"]
        assert row["eval_shapes_fd"] > 0  # random-teacher samples are far from rendered truth
        assert (out / "eval" / f"step-{row['step']:08d}.png").is_file()
    kept = sorted(p.name for p in (out / "best").glob("step-*.safetensors"))
    assert len(kept) == 2 and kept == _expected_best(evaluations, "eval_shapes", 2, higher=True)
    index = json.loads((out / "best" / "index.json").read_text())
    assert [e["value"] for e in index] == sorted((e["value"] for e in index), reverse=True)  # best (highest) first


def test_distill_with_fd_on_shapes_keeps_the_lowest(tmp_path):
    from sid_fast.shapes.evaluate import rendered_truth

    reference = write_reference(fd_features(rendered_truth(CAPTIONS, 64, seed=0)), tmp_path / "truth.safetensors")
    out = _shapes_run(tmp_path, "fd", "--eval.metric=fd", f"--eval.reference={reference}")
    evaluations = [row for row in _log(out) if "eval_fd" in row]
    assert len(evaluations) == 4 and len({row["eval_fd"] for row in evaluations}) == 4  # training changes the samples
    kept = sorted(p.name for p in (out / "best").glob("step-*.safetensors"))
    assert kept == _expected_best(evaluations, "eval_fd", 2, higher=False)
    index = json.loads((out / "best" / "index.json").read_text())
    assert [e["value"] for e in index] == sorted(e["value"] for e in index)  # best (lowest) first
    assert len(list((out / "eval").glob("step-*.png"))) == 4


def test_api_distill_builds_the_evaluator_on_the_exact_mixture(tmp_path):
    from sid_fast import distill
    from sid_fast.models.mixture import LabelConditions, MixtureTeacher, ring_mixture
    from sid_fast.models.mlp import VelocityMLP

    config = load_config(None, ["method.num_steps=1", "train.batch_size=8", "train.iterations=5", "train.progress=false",
                                "train.resume=false", f"train.out_dir={tmp_path}", "train.log_every=1",
                                "eval.every_images=16", "eval.num_samples=16", "eval.keep_best=3", "eval.grid=0",
                                "health.tensorboard=false"])
    teacher = MixtureTeacher(ring_mixture(8, 2.0, 0.2, num_classes=4))
    result = distill(teacher, LabelConditions(4), (2,), config, student=VelocityMLP(2, hidden=16, depth=2, num_classes=4))
    evaluations = [row for row in result.history if "eval_fd" in row]
    assert len(evaluations) == 5 and all(row["eval_fd"] > 0 for row in evaluations)
    kept = sorted(p.name for p in (tmp_path / "best").glob("step-*.safetensors"))
    assert kept == _expected_best(evaluations, "eval_fd", 3, higher=False)
    labels = result.trainer.evaluator.prompts.labels
    assert labels.tolist() == [i % 4 for i in range(16)]  # the fixed prompt set: class i mod C


def test_required_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="eval.inception_weights"):
        load_config(None, ["eval.every_images=8", "eval.metric=fid"])
    reference = write_reference(torch.randn(20, 3).double(), tmp_path / "ref.safetensors")
    with pytest.raises(ValueError, match="eval.reference"):
        load_config(None, ["eval.every_images=8", "eval.metric=fid", f"eval.inception_weights={reference}"])
    with pytest.raises(ValueError, match="eval.clip_model"):
        load_config(None, ["eval.every_images=8", "eval.metric=clip"])
    with pytest.raises(ValueError, match="eval.reference.*does not exist"):
        load_config(None, [f"eval.reference={tmp_path / 'missing.safetensors'}"])
    load_config(None, ["eval.metric=fid"])  # evaluation off: nothing is required
    # fd on a teacher without its own ground truth needs eval.reference, of the right feature size
    bank = Conditioning(embeds=torch.randn(3, 4, 8))
    conditions = EmbeddingConditions(bank, Conditioning(embeds=torch.zeros(1, 4, 8)), ["a", "b", "c"])
    config = load_config(None, ["eval.every_images=8", "eval.num_samples=4", f"train.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="eval.reference: eval.metric=fd needs reference features"):
        build_evaluator(config, conditions, (3, 8, 8))
    config = load_config(None, ["eval.every_images=8", "eval.num_samples=4", f"eval.reference={reference}",
                                f"train.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"eval.reference: .* 3-d features; .* needs 48"):
        build_evaluator(config, conditions, (3, 8, 8))
    for metric, shape, message in (("shapes", (3, 32, 32), "ShapesWorld captions"), ("shapes", (16, 8, 8), "pixel-space"),
                                   ("clip", (2,), "not images")):
        config = load_config(None, ["eval.every_images=8", "eval.num_samples=4", f"eval.metric={metric}",
                                    f"eval.clip_model={tmp_path}", f"train.out_dir={tmp_path}"])
        with pytest.raises(ValueError, match=f"eval.metric: .*{message}"):
            build_evaluator(config, conditions, shape)


def test_prompt_set_is_fixed_and_cycled_from_shards_and_banks(tmp_path):
    prompts = tmp_path / "prompts.txt"
    texts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
    prompts.write_text("\n".join(texts) + "\n")
    assert main(["prepare", "prompts", str(prompts), "--out", str(tmp_path / "shards"), "--encoder", "tiny",
                 "--samples-per-shard", "4", "--no-progress"]) == 0
    from sid_fast.data import ShardConditions

    conditions = ShardConditions(tmp_path / "shards", num_workers=0, seed=5, shuffle_buffer=4)
    config = load_config(None, ["eval.num_samples=8"])
    cond, got = eval_prompt_set(config, conditions)
    assert got == (texts + texts)[:8]  # shard order, not the training shuffle; cycled past the 6 prompts
    assert len(cond) == 8 and torch.equal(cond.embeds[6], cond.embeds[0]) and not torch.equal(cond.embeds[1], cond.embeds[0])
    assert conditions.stats()["served"] == 0  # the training stream was not touched
    again, _ = eval_prompt_set(config, conditions)
    assert torch.equal(again.embeds, cond.embeds)
    bank = Conditioning(embeds=torch.randn(3, 2, 4))
    cond, got = eval_prompt_set(load_config(None, ["eval.num_samples=5"]),
                                EmbeddingConditions(bank, Conditioning(embeds=torch.zeros(1, 2, 4)), ["x", "y", "z"]))
    assert got == ["x", "y", "z", "x", "y"] and torch.equal(cond.embeds[3], bank.embeds[0])


def test_shapes_score_on_truth_and_noise_and_its_direction(tmp_path):
    from sid_fast.eval.inloop import InLoopEvaluator
    from sid_fast.shapes.evaluate import rendered_truth
    from sid_fast.shapes.features import FeatureNet, features

    truth = rendered_truth(CAPTIONS, 6, seed=1)  # image i shows caption i mod 3
    captions = [CAPTIONS[i % 3] for i in range(6)]
    torch.manual_seed(0)
    net = FeatureNet(width=4).eval()
    reference = FeatureStats(37)
    reference.update(features(net, rendered_truth(CAPTIONS, 60, seed=2)))
    metric = ShapesScore(net, reference.mean_cov())
    metric.update(truth[:2], captions[:2])
    metric.update(truth[2:], captions[2:])
    assert metric.compute() == 1.0
    fd_truth = metric.details["fd"]
    assert fd_truth == pytest.approx(frechet_distance_of(features(net, truth), features(net, rendered_truth(CAPTIONS, 60, seed=2))),
                                     rel=1e-6)
    noise = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    metric.update(noise, captions)
    assert metric.compute() == 0.0 and metric.details["fd"] > fd_truth
    swapped = [CAPTIONS[(i + 1) % 3] for i in range(6)]  # right images, wrong captions
    plain = ShapesScore()
    plain.update(truth, swapped)
    assert plain.compute() == 0.0 and "fd" not in plain.details
    config = load_config(None, ["eval.every_images=4", "eval.num_samples=6", "eval.metric=shapes", f"train.out_dir={tmp_path}"])
    cond = Conditioning(embeds=torch.zeros(6, 2, 4))
    assert InLoopEvaluator(config, cond, plain, prompt_texts=captions).best.higher
    assert not InLoopEvaluator(config, cond, FrechetMetric(fd_features, reference.mean_cov())).best.higher
    with pytest.raises(ValueError, match="prompt texts"):
        InLoopEvaluator(config, cond, plain)


def test_fid_on_a_latent_teacher_decodes_through_its_vae(tmp_path):
    """sd3 tiny preset: latents (16, 8, 8) are decoded by the teacher's VAE to (3, 32, 32) images before Inception."""
    from torch import nn

    from sid_fast.eval.build import VAEDecoder, build_decoder
    from sid_fast.models import tiny_components

    class Fake(nn.Module):  # a TorchScript stand-in for Inception: channel means of uint8 images
        def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return images.float().mean(dim=(2, 3)) if return_features else images

    inception = tmp_path / "inception.pt"
    torch.jit.script(Fake()).save(str(inception))
    reference = write_reference(torch.rand(50, 3).double() * 255, tmp_path / "ref.safetensors")
    config = load_config(None, ["teacher.kind=sd3", "teacher.preset=tiny", "eval.every_images=8", "eval.num_samples=4",
                                "eval.metric=fid", f"eval.inception_weights={inception}", f"eval.reference={reference}",
                                f"train.out_dir={tmp_path}"])
    bank = Conditioning(embeds=torch.randn(4, 2, 8))
    evaluator = build_evaluator(config, EmbeddingConditions(bank, Conditioning(embeds=torch.zeros(1, 2, 8))), (16, 8, 8))
    assert isinstance(evaluator.decode, VAEDecoder)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    images = evaluator.decode(latents)
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1
    vae = tiny_components.seeded(lambda: tiny_components.vae("sd3", "tiny"), 2)  # the pipeline's VAE (seed + 2)
    with torch.no_grad():
        direct = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, direct)
    evaluator.metric.update(images)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round()
    mu, sigma = load_reference(reference)
    stats = FeatureStats(3)
    stats.update(pixels.mean(dim=(2, 3)))
    assert evaluator.metric.compute() == pytest.approx(frechet_distance(*stats.mean_cov(), mu, sigma), rel=1e-9)
    assert build_decoder(load_config(None, ["teacher.kind=shapes"]).teacher) is None
    tiny_components.save_teacher("sd3", tmp_path / "sd3")  # a teacher directory: its own vae/ decodes
    from_dir = build_decoder(load_config(None, ["teacher.kind=sd3", f"teacher.path={tmp_path / 'sd3'}"]).teacher)
    torch.testing.assert_close(from_dir(latents), direct)
