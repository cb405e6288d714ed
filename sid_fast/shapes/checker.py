"""The exact attribute checker of ShapesWorld: image -> detected objects -> is the caption satisfied?

Segmentation: each pixel is assigned to the nearest palette colour when within `colour_radius` (RGB, 0–255) of it,
else to the background; connected components (8-neighbour) of one colour with at least `min_area` pixels are
objects. Geometry: the bounding box gives size (side / R vs `SIZE_SPLIT`) and position (its centre); the shape is
the one whose template, drawn as the renderer draws it and fitted (side, sub-pixel offset) to the component's
coverage map (the projection of each pixel on its palette colour), leaves the least squared error.
A prompt is correct when every named object is found as described (distinct detections, relation between their
box centres) and, with `exact_count`, the image holds no other object.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from sid_fast.shapes.captions import parse_caption
from sid_fast.shapes.world import PALETTE, SHAPES, SIZE_SPLIT, SUPERSAMPLE, ObjectSpec, PromptSpec, shape_mask

OFFSETS = (-0.5, -0.25, 0.0, 0.25, 0.5)
_COLOURS = np.array(list(PALETTE.values()), dtype=np.float32)  # (K, 3)
_NAMES = list(PALETTE)


@dataclass(frozen=True)
class Detection:
    """One segmented object: bounding-box centre (cx, cy) and side in pixels, area in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    side: float
    area: int


@functools.lru_cache(maxsize=1024)
def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Shape -> (V, h + 2, w + 2) coverage maps of the shape drawn as `render` draws it, centred on an h×w box with a
    1-px margin: sides from max(h, w) − ½ to max(h, w) + 3 in ½-px steps, centre offsets in ¼-px steps up to ½ px."""
    size_y, size_x = (height + 2) * SUPERSAMPLE, (width + 2) * SUPERSAMPLE
    ys, xs = torch.meshgrid((torch.arange(size_y) + 0.5) / SUPERSAMPLE, (torch.arange(size_x) + 0.5) / SUPERSAMPLE,
                            indexing="ij")
    side = max(height, width)
    params = torch.tensor(list(itertools.product(np.arange(side - 0.5, side + 3.01, 0.5), OFFSETS, OFFSETS)),
                          dtype=torch.float32)  # (V, 3): side, dx, dy
    view = (-1, 1, 1)
    templates = {}
    for shape in SHAPES:
        fine = shape_mask(shape, (width + 2) / 2 + params[:, 1].view(view), (height + 2) / 2 + params[:, 2].view(view),
                          params[:, 0].view(view), xs, ys).float()  # (V, Hs, Ws)
        templates[shape] = torch.nn.functional.avg_pool2d(fine[:, None], SUPERSAMPLE)[:, 0].numpy()  # (V, h+2, w+2)
    return templates


def classify_shape(coverage: np.ndarray) -> str:
    """The shape whose best-fitting template (least squares over side and offset, see `_templates`) fits the
    coverage map (h + 2, w + 2) of one component (its box with a 1-px margin) best."""
    errors = {shape: float(((masks - coverage) ** 2).sum((1, 2)).min())
              for shape, masks in _templates(coverage.shape[0] - 2, coverage.shape[1] - 2).items()}
    return min(errors, key=errors.get)


def detect(image: Tensor, colour_radius: float = 80.0, min_area: int = 12) -> list[Detection]:
    """image: (3, R, R) in [-1, 1] -> detected objects (any order)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"detect: image must be (3, R, R), got {tuple(image.shape)}")
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()  # (R, R, 3)
    distance = np.linalg.norm(pixels[:, :, None, :] - _COLOURS[None, None], axis=-1)  # (R, R, K)
    nearest = distance.argmin(-1)
    assigned = np.where(distance.min(-1) <= colour_radius, nearest, -1)  # (R, R)
    padded_pixels = np.pad(pixels, ((1, 1), (1, 1), (0, 0)))  # (R + 2, R + 2, 3): windows never leave the image
    padded_assigned = np.pad(assigned, 1, constant_values=-1)
    found = []
    for index, name in enumerate(_NAMES):
        colour = _COLOURS[index]
        labels, _ = ndimage.label(assigned == index, structure=np.ones((3, 3)))
        for box_index, box in enumerate(ndimage.find_objects(labels)):
            component = labels[box] == box_index + 1
            area = int(component.sum())
            if area < min_area:
                continue
            window = (slice(box[0].start, box[0].stop + 2), slice(box[1].start, box[1].stop + 2))  # box ± 1 px, padded
            coverage = np.clip(padded_pixels[window] @ colour / float(colour @ colour), 0.0, 1.0)  # a·colour on black
            other = (padded_assigned[window] != index) & (padded_assigned[window] != -1)
            coverage = np.where(other, 0.0, coverage)  # (h + 2, w + 2)
            centre_x, centre_y = (box[1].start + box[1].stop) / 2, (box[0].start + box[0].stop) / 2
            side = float(max(component.shape))
            found.append(Detection(name, classify_shape(coverage), centre_x, centre_y, side, area))
    return found


def _matches(spec: ObjectSpec, found: Detection, resolution: int) -> bool:
    if (found.colour, found.shape) != (spec.colour, spec.shape):
        return False
    if spec.size is not None and (found.side / resolution >= SIZE_SPLIT) != (spec.size == "large"):
        return False
    x, y = found.cx / resolution, found.cy / resolution
    return {None: True, "left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6,
            "centre": abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15}[spec.position]


def _relation_holds(relation: str | None, first: Detection, second: Detection) -> bool:
    dx, dy = second.cx - first.cx, second.cy - first.cy
    return {None: True, "left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[relation]


def check(image: Tensor, prompt: PromptSpec | str, exact_count: bool = True, **detect_options) -> bool:
    """Whether `image` (3, R, R) in [-1, 1] shows `prompt` (a PromptSpec or a caption, parsed)."""
    if isinstance(prompt, str):
        prompt = parse_caption(prompt)
    found = detect(image, **detect_options)
    if exact_count and len(found) != len(prompt.objects):
        return False
    resolution = image.shape[-1]
    candidates = [[d for d in found if _matches(spec, d, resolution)] for spec in prompt.objects]
    if len(prompt.objects) == 1:
        return bool(candidates[0])
    return any(a is not b and _relation_holds(prompt.relation, a, b) for a in candidates[0] for b in candidates[1])


def check_batch(images: Tensor, prompts: list[PromptSpec | str], **options) -> Tensor:
    """images (B, 3, R, R) -> (B,) bool."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"check_batch: {images.shape[0]} images but {len(prompts)} prompts")
    return torch.tensor([check(image, prompt, **options) for image, prompt in zip(images, prompts)])


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (z = 1.96)."""
    if total <= 0:
        raise ValueError(f"wilson_interval: total must be > 0, got {total}")
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Score:
    """A proportion with its 95% Wilson interval."""

    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.3f} [{low:.3f}, {high:.3f}] (n={self.total})"


def score(images: Tensor, prompts: list[PromptSpec | str], **options) -> Score:
    """Fraction of `images` (B, 3, R, R) correct for their prompts, with its 95% Wilson interval."""
    correct = check_batch(images, prompts, **options)
    return Score(int(correct.sum()), len(prompts))
