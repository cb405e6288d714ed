"""The exact attribute checker: ≥ 0.99 on rendered truth, ≤ 0.01 on noise and on mismatched captions (Wilson 95%)."""

import dataclasses
import random

import pytest
import torch

from sid_fast.shapes.captions import caption_set
from sid_fast.shapes.checker import Score, check, detect, score, wilson_interval
from sid_fast.shapes.world import PALETTE, SHAPES, ObjectSpec, PromptSpec, render_batch, sample_scene

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "centre": "left",
            "left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _truth(objects: int, count: int, seed: int):
    rng = random.Random(seed)
    pairs = caption_set(objects, rng.choice(["train", "heldout"]))
    pairs = [pairs[rng.randrange(len(pairs))] for _ in range(count)]
    return render_batch([sample_scene(spec, rng) for _, spec in pairs]), pairs


def _mismatch(spec: PromptSpec, rng: random.Random) -> PromptSpec:
    """Change one named attribute so that the image cannot satisfy it."""
    index = rng.randrange(len(spec.objects))
    obj = spec.objects[index]
    used = {o.colour for o in spec.objects}
    choices = ["colour", "shape"] + (["size"] if obj.size else []) + (["position"] if obj.position else [])
    choices += ["relation"] if spec.relation else []
    what = rng.choice(choices)
    if what == "relation":
        return dataclasses.replace(spec, relation=OPPOSITE[spec.relation])
    if what == "colour":
        obj = dataclasses.replace(obj, colour=rng.choice([c for c in PALETTE if c not in used]))
    elif what == "shape":
        obj = dataclasses.replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif what == "size":
        obj = dataclasses.replace(obj, size="small" if obj.size == "large" else "large")
    else:
        obj = dataclasses.replace(obj, position=OPPOSITE[obj.position])
    objects = list(spec.objects)
    objects[index] = obj
    return dataclasses.replace(spec, objects=tuple(objects))


@pytest.mark.parametrize("objects", [1, 2])
def test_checker_on_ground_truth_noise_and_mismatches(objects):
    images, pairs = _truth(objects, 300, seed=objects)
    truth = score(images, [caption for caption, _ in pairs])  # captions parsed: the text path is what users call
    rng = random.Random(10 + objects)
    mismatched = score(images, [_mismatch(spec, rng) for _, spec in pairs])
    generator = torch.Generator().manual_seed(objects)
    uniform = torch.rand(150, 3, 32, 32, generator=generator) * 2 - 1
    gaussian = (torch.randn(150, 3, 32, 32, generator=generator) * 0.5).clamp(-1, 1)
    noise = score(torch.cat([uniform, gaussian]), [spec for _, spec in pairs])
    print(f"{objects}-object: truth {truth}, mismatched {mismatched}, noise {noise}")
    assert truth.value >= 0.99
    assert mismatched.value <= 0.01
    assert noise.value <= 0.01


def test_detection_reads_back_attributes():
    rng = random.Random(3)
    spec = PromptSpec((ObjectSpec("triangle", "cyan", "large", "centre"),))
    (found,) = detect(render_batch([sample_scene(spec, rng)])[0])
    assert (found.colour, found.shape) == ("cyan", "triangle") and found.side / 32 > 0.45
    assert abs(found.cx - 16) < 3 and abs(found.cy - 16) < 3


def test_exact_count_rejects_extra_objects():
    spec = PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")))
    image = render_batch([sample_scene(spec, random.Random(0))])[0]
    one = PromptSpec((ObjectSpec("circle", "red"),))
    assert not check(image, one) and check(image, one, exact_count=False)
    assert check(image, spec)


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert abs(low - 0.2366) < 1e-4 and abs(high - 0.7634) < 1e-4
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and abs(high - 0.2775) < 1e-4
    assert str(Score(99, 100)).startswith("0.990 [0.946, 0.998]")  # 0.94554, 0.99823
    with pytest.raises(ValueError, match="total"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"\(3, R, R\)"):
        detect(torch.zeros(1, 32, 32))
