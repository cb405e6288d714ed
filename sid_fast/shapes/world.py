"""ShapesWorld: scenes of coloured shapes on a black background, rendered as small RGB images.

A scene holds one or two objects, each with a shape, a colour from a well-separated palette, a size class and a
position. Rendering is exact geometry (half-plane and distance tests) on a 4× supersampled grid, box-filtered to
R×R, so edges are anti-aliased and a scene renders bit-identically on every machine.

    scene = sample_scene(ObjectSpec("circle", "red", "small", "left"), rng, resolution=32)
    image = render(scene)            # (3, 32, 32) float32 in [-1, 1]
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 70, 240),
    "yellow": (240, 220, 30), "magenta": (220, 40, 220), "cyan": (30, 210, 220),
}
"""Colour name -> RGB (0–255). Pairwise distances ≥ 190, every colour ≥ 240 from the black background."""
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, tuple[float, float]] = {"small": (0.3, 0.36), "large": (0.5, 0.6)}
"""Size class -> range of the object's side (bounding-box extent) as a fraction of the image side."""
SIZE_SPLIT = 0.43
"""Side fraction separating small from large for the checker (between the two ranges above)."""
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; None fields are left free (drawn at random by the renderer)."""

    shape: str
    colour: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"ObjectSpec.shape: unknown shape {self.shape!r}; known: {SHAPES}")
        if self.colour not in PALETTE:
            raise ValueError(f"ObjectSpec.colour: unknown colour {self.colour!r}; known: {tuple(PALETTE)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"ObjectSpec.size: unknown size {self.size!r}; known: {tuple(SIZES)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"ObjectSpec.position: unknown position {self.position!r}; known: {POSITIONS}")


@dataclass(frozen=True)
class PromptSpec:
    """A caption's content: one object, or two objects with an optional relation ("first <relation> second")."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"PromptSpec.objects: 1 or 2 objects, got {len(self.objects)}")
        if self.relation is not None and (len(self.objects) != 2 or self.relation not in RELATIONS):
            raise ValueError(f"PromptSpec.relation: {self.relation!r} needs two objects and one of {RELATIONS}")
        if len(self.objects) == 2 and self.objects[0].colour == self.objects[1].colour:
            raise ValueError("PromptSpec.objects: two objects must differ in colour (the checker segments by colour)")


@dataclass(frozen=True)
class PlacedObject:
    """A concrete object: centre (cx, cy) and side, all in pixels of the R×R image."""

    shape: str
    colour: str
    cx: float
    cy: float
    side: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[PlacedObject, ...]
    resolution: int = 32


def _position_box(position: str | None, half: float, resolution: int) -> tuple[float, float, float, float]:
    """(x_lo, x_hi, y_lo, y_hi) allowed for the centre of an object of half-side `half` at `position`.

    Regions are strictly inside the checker's (left: cx < 0.4 R; here ≤ 0.33 R) so rendered truth has a margin.
    """
    lo, hi = half + 0.5, resolution - half - 0.5
    x_lo, x_hi, y_lo, y_hi = lo, hi, lo, hi
    if position == "left":
        x_hi = min(hi, 0.33 * resolution)
    elif position == "right":
        x_lo = max(lo, 0.67 * resolution)
    elif position == "top":
        y_hi = min(hi, 0.33 * resolution)
    elif position == "bottom":
        y_lo = max(lo, 0.67 * resolution)
    elif position == "centre":
        x_lo, x_hi = max(lo, 0.42 * resolution), min(hi, 0.58 * resolution)
        y_lo, y_hi = x_lo, x_hi
    if x_lo > x_hi or y_lo > y_hi:
        raise ValueError(f"position {position!r} cannot hold an object of side {2 * half:.1f} in {resolution} px")
    return x_lo, x_hi, y_lo, y_hi


def _place(spec: ObjectSpec, rng: random.Random, resolution: int,
           free_size: tuple[str, ...] = tuple(SIZES)) -> PlacedObject:
    size = spec.size if spec.size is not None else rng.choice(free_size)
    low, high = SIZES[size]
    side = rng.uniform(low, high) * resolution
    x_lo, x_hi, y_lo, y_hi = _position_box(spec.position, side / 2, resolution)
    return PlacedObject(spec.shape, spec.colour, rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi), side)


def _separated(a: PlacedObject, b: PlacedObject, relation: str | None, gap: float) -> bool:
    """Boxes apart by `gap` px, and the relation holds with a margin of `gap` px between the centres' boxes."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    reach = (a.side + b.side) / 2 + gap
    if relation is None:
        return abs(dx) >= reach or abs(dy) >= reach
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    return along >= reach


def sample_scene(prompt: PromptSpec | ObjectSpec, rng: random.Random, resolution: int = 32,
                 max_tries: int = 1000) -> Scene:
    """A random scene satisfying `prompt` (free attributes drawn from `rng`); two objects never touch."""
    if isinstance(prompt, ObjectSpec):
        prompt = PromptSpec((prompt,))
    if len(prompt.objects) == 1:
        return Scene((_place(prompt.objects[0], rng, resolution),), resolution)
    for _ in range(max_tries):
        first, second = (_place(spec, rng, resolution, ("small",)) for spec in prompt.objects)  # two large never fit
        if _separated(first, second, prompt.relation, gap=0.06 * resolution):
            return Scene((first, second), resolution)
    raise ValueError(f"could not place {prompt} in {resolution} px after {max_tries} tries")


def shape_mask(shape: str, cx: float, cy: float, side: float, xs: Tensor, ys: Tensor) -> Tensor:
    """Boolean mask of `shape` (centre (cx, cy), extent `side`) at sample points xs, ys (pixel units)."""
    half = side / 2
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= half
    if shape == "triangle":  # apex up: width grows linearly from 0 at the top edge to `side` at the bottom edge
        depth = dy + half  # 0 at the top edge
        return (depth >= 0) & (dy <= half) & (dx.abs() <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene) -> Tensor:
    """Scene -> (3, R, R) float32 image in [-1, 1] (black background, anti-aliased by 4×4 supersampling)."""
    size = scene.resolution * SUPERSAMPLE
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (S, S)
    canvas = torch.zeros(3, size, size)
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.side, xs, ys)  # (S, S)
        colour = torch.tensor(PALETTE[obj.colour], dtype=torch.float32).view(3, 1, 1) / 255.0
        canvas = torch.where(mask, colour, canvas)
    image = torch.nn.functional.avg_pool2d(canvas[None], SUPERSAMPLE)[0]  # (3, R, R) in [0, 1]
    return image * 2.0 - 1.0


def render_batch(scenes: list[Scene]) -> Tensor:
    """(B, 3, R, R) float32 in [-1, 1]."""
    return torch.stack([render(scene) for scene in scenes])
