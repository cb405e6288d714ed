"""ShapesWorld rendering and captions: determinism, geometry that matches the spec, captions and the held-out split."""

import random

import pytest
import torch

from sid_fast.shapes.captions import all_specs, caption_set, captions_for, is_heldout, parse_caption
from sid_fast.shapes.world import (
    PALETTE,
    SIZE_SPLIT,
    ObjectSpec,
    PlacedObject,
    PromptSpec,
    Scene,
    render,
    render_batch,
    sample_scene,
)


def test_rendering_is_deterministic_for_a_seed_and_in_range():
    spec = PromptSpec((ObjectSpec("triangle", "green"), ObjectSpec("circle", "yellow")), "left of")
    first = render_batch([sample_scene(spec, random.Random(7)) for _ in range(3)])
    again = render_batch([sample_scene(spec, random.Random(7)) for _ in range(3)])
    other = render_batch([sample_scene(spec, random.Random(8)) for _ in range(3)])
    assert first.shape == (3, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= -1 and first.max() <= 1


def test_rendered_pixels_have_the_named_colour_and_black_background():
    scene = Scene((PlacedObject("square", "blue", 16.0, 16.0, 12.0),))
    image = render(scene)
    assert torch.allclose(image[:, 16, 16], torch.tensor(PALETTE["blue"]) / 127.5 - 1)
    assert torch.equal(image[:, 1, 1], torch.full((3,), -1.0))
    # a 12-px square centred at 16 covers pixels 10..21 fully: 144 pixels of full colour
    assert int((image == image[:, 16:17, 16:17]).all(0).sum()) == 144


@pytest.mark.parametrize("seed", range(3))
def test_scenes_satisfy_their_spec(seed):
    rng = random.Random(seed)
    for spec in rng.sample(all_specs(1), 60):
        (obj,) = sample_scene(spec, rng).objects
        o = spec.objects[0]
        if o.size is not None:
            assert (obj.side / 32 >= SIZE_SPLIT) == (o.size == "large")
        x, y = obj.cx / 32, obj.cy / 32
        assert {None: True, "left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6,
                "centre": abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15}[o.position]
        assert obj.side / 2 <= obj.cx <= 32 - obj.side / 2 and obj.side / 2 <= obj.cy <= 32 - obj.side / 2
    for spec in rng.sample([s for s in all_specs(2) if s.relation], 40):
        a, b = sample_scene(spec, rng).objects
        along = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
        assert along[spec.relation] >= (a.side + b.side) / 2  # apart along the relation's axis: boxes never touch


def test_captions_parse_back_and_are_unique():
    for objects in (1, 2):
        specs = all_specs(objects)
        seen = {}
        for spec in specs:
            phrasings = captions_for(spec)
            assert len(phrasings) >= 2
            for caption in phrasings:
                assert parse_caption(caption) == spec, caption
                assert seen.setdefault(caption, spec) == spec, f"{caption!r} names two specs"
    assert parse_caption("a green triangle left of a yellow circle") == PromptSpec(
        (ObjectSpec("triangle", "green"), ObjectSpec("circle", "yellow")), "left of")
    assert parse_caption("A big red square on the left") == PromptSpec((ObjectSpec("square", "red", "large", "left"),))


def test_heldout_split_is_disjoint_stable_and_covers_every_object_in_training():
    for objects in (1, 2):
        train, heldout = caption_set(objects, "train"), caption_set(objects, "heldout")
        assert not {c for c, _ in train} & {c for c, _ in heldout}
        assert not {s for _, s in train} & {s for _, s in heldout}  # held out by content, not by phrasing
        share = len({s for _, s in heldout}) / len(all_specs(objects))
        assert 0.05 < share < 0.15
        assert all(is_heldout(s) for _, s in heldout) and caption_set(objects, "heldout") == heldout
    pairs = {(o.colour, o.shape) for _, s in caption_set(1, "train") for o in s.objects}
    assert len(pairs) == len(PALETTE) * 4


def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="ObjectSpec.colour"):
        ObjectSpec("circle", "orange")
    with pytest.raises(ValueError, match="differ in colour"):
        PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "red")))
    with pytest.raises(ValueError, match="exactly one colour"):
        parse_caption("a circle")
