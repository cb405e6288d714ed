"""The ShapesWorld text encoder (all-MiniLM-L6-v2, offline) and `sid-fast prepare prompts --encoder shapes`."""

import pytest
import torch

from sid_fast.data.encoding import build_encoders, teacher_id
from sid_fast.encoders.minilm import MiniLMEncoder


@pytest.fixture(scope="module")
def encoder():
    return MiniLMEncoder()


def test_encoding_shapes_mask_and_pooling(encoder):
    prompts = ["a red circle", "a big blue square on the left", "a green triangle left of a yellow circle"]
    cond = encoder.encode(prompts)
    assert cond.embeds.shape == (3, 20, 384) and cond.pooled.shape == (3, 384) and cond.mask.shape == (3, 20)
    tokens = cond.mask.sum(1)
    assert tokens.tolist() == [len(encoder.tokenizer(p)["input_ids"]) for p in prompts]
    assert (cond.embeds[cond.mask == 0] == 0).all()  # nothing past a prompt's end
    mean = cond.embeds.sum(1) / tokens[:, None]
    assert torch.allclose(cond.pooled, torch.nn.functional.normalize(mean, dim=-1), atol=1e-6)
    assert torch.allclose(cond.pooled.norm(dim=-1), torch.ones(3))
    # sentence embeddings of MiniLM: paraphrases are closer than captions naming other objects
    other = encoder.encode(["a circle in red", "a yellow square"]).pooled
    assert other[0] @ cond.pooled[0] > other[1] @ cond.pooled[0]


def test_unconditional_is_the_empty_prompt_and_batches_agree(encoder):
    uncond = encoder.unconditional()
    assert len(uncond) == 1 and uncond.mask.sum() == 2  # [CLS] [SEP]
    assert torch.equal(uncond.embeds, encoder.encode([""]).embeds)
    alone = encoder.encode(["a small cyan diamond"])
    batched = encoder.encode(["a small cyan diamond", "a picture of a big magenta square at the top"])
    assert torch.allclose(alone.embeds[0], batched.embeds[0], atol=1e-5)


def test_errors_name_the_prompt(encoder):
    with pytest.raises(ValueError, match="more than max_length=20"):
        encoder.encode(["a " + "very " * 30 + "long prompt"])
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode("a red circle")


def test_prepare_prompts_with_the_shapes_encoder(tmp_path):
    from sid_fast.cli import main
    from sid_fast.data.format import ShardManifest

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left\na green triangle above a yellow circle\n")
    assert main(["prepare", "prompts", str(prompts), "--out", str(tmp_path / "shards"), "--encoder", "shapes",
                 "--dtype", "float32", "--no-progress"]) == 0
    manifest = ShardManifest.load(tmp_path / "shards")
    assert manifest.count == 3 and manifest.teacher_id == teacher_id("shapes") == "shapes:all-minilm-l6-v2:L20"
    assert tuple(manifest.fields["embeds"]["shape"]) == (20, 384)
    with pytest.raises(ValueError, match="pixel space"):
        build_encoders("shapes", resolution=32)


def test_shapes_teacher_with_a_prompt_file_encodes_it(tmp_path):
    from sid_fast.config import TeacherConfig
    from sid_fast.models.registry import build_teacher

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left\n")
    bundle = build_teacher(TeacherConfig(kind="shapes", preset="tiny", prompts=str(prompts)))
    assert len(bundle.conditions) == 2
    cond = bundle.conditions.sample(4, torch.Generator().manual_seed(0))
    velocity = bundle.teacher(torch.randn(4, 3, 32, 32), torch.full((4,), 0.5), cond)
    assert velocity.shape == (4, 3, 32, 32)
    assert torch.equal(bundle.conditions.unconditional(1).embeds, MiniLMEncoder().unconditional().embeds)


def test_sid_distill_runs_on_the_shapes_family(tmp_path):
    from safetensors.torch import load_file

    from sid_fast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left\n")
    out = tmp_path / "sid"
    assert main(["distill", "--teacher.kind=shapes", "--teacher.preset=tiny", f"--teacher.prompts={prompts}",
                 "--train.iterations=2", "--train.batch_size=2", f"--train.out_dir={out}", "--train.progress=false",
                 "--method.num_steps=2", "--health.tensorboard=false"]) == 0
    weights = load_file(str(out / "generator.safetensors"))
    assert weights and all(torch.isfinite(value).all() for value in weights.values())
