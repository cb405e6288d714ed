"""The ShapesWorld weights the project ships (sid_fast/assets/shapes/): each loads, is float16 and at most 20 MB
with its card, and the shipped one-step SiD generator still does its job — on 100 held-out one-object prompts it is
right far more often than the teacher's own one-step Euler sampler, as measured when it was shipped (0.78–0.80 against
0.22–0.24 on 200–400 prompts; README)."""

import pytest
import torch

from sid_fast.demo.shapes import REFERENCE_GENERATORS, load_generator
from sid_fast.models.shapes import SHIPPED_TEACHER, read_card

SHIPPED = {"teacher": SHIPPED_TEACHER, "sid-1step": REFERENCE_GENERATORS[1], "sid-4step": REFERENCE_GENERATORS[4]}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_is_small_half_precision_and_carries_its_card(name):
    from safetensors.torch import load_file

    path = SHIPPED[name]
    assert path.is_file(), f"{path} is missing"
    assert path.stat().st_size <= 20e6
    weights = load_file(str(path))
    assert weights and all(value.dtype == torch.float16 for value in weights.values())
    card = read_card(path)
    assert card["scores"], f"{path}'s card has no scores"


def test_shipped_one_step_generator_beats_the_teachers_one_step_sampler():
    from sid_fast.encoders.minilm import MiniLMEncoder
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import load_shapes_transformer
    from sid_fast.shapes.checker import score
    from sid_fast.shapes.evaluate import generator_samples, heldout_prompts, teacher_samples

    encoder = MiniLMEncoder(max_length=20)
    prompts = heldout_prompts(1, 100, seed=3)
    cond = encoder.encode([caption for caption, _ in prompts])
    uncond = encoder.unconditional()
    specs = [spec for _, spec in prompts]
    generator, card = load_generator(REFERENCE_GENERATORS[1])
    assert card["num_steps"] == 1
    student = score(generator_samples(generator, cond, num_steps=1, seed=3), specs)
    teacher = SD3Adapter(load_shapes_transformer(SHIPPED_TEACHER)).eval()
    one_step = score(teacher_samples(teacher, cond, uncond, steps=1, guidance=4.0, seed=3), specs)
    assert student.value >= 0.6, str(student)
    assert student.interval[0] > one_step.interval[1], (str(student), str(one_step))
