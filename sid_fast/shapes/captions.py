"""Captions of ShapesWorld scenes: every phrasing of a `PromptSpec`, the caption sets, the held-out split, and a
parser from caption text back to its `PromptSpec` (so the checker can score any prompt file).

One-object captions ("a small red circle on the left", "a picture of a blue square", ...) are the primary set;
two-object captions ("a green triangle left of a yellow circle", "a red square and a blue diamond") the harder
second set. The held-out split is by content: a spec (all of its phrasings) is held out when a sha256 of its
canonical form falls in the held-out fraction, so no held-out caption is ever seen in training.
"""

from __future__ import annotations

import hashlib
import itertools
import re

from sid_fast.shapes.world import PALETTE, POSITIONS, RELATIONS, SHAPES, SIZES, ObjectSpec, PromptSpec

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {"left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
                    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                    "centre": ("in the centre", "in the middle")}
RELATION_PHRASES = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
                    "above": ("above", "over"), "below": ("below", "under")}
HELDOUT_PERCENT = 10
"""Percent of specs (with all their phrasings) held out of training."""


def _object_phrases(spec: ObjectSpec) -> list[str]:
    """Every phrasing of one object, e.g. "a small red circle on the left", "one little circle in red at the top"."""
    sizes = [""] if spec.size is None else [w + " " for w in SIZE_WORDS[spec.size]]
    positions = [""] if spec.position is None else [" " + p for p in POSITION_PHRASES[spec.position]]
    phrases = []
    for index, (size, position) in enumerate(itertools.product(sizes, positions)):
        article = "one" if index % 2 else "a"
        phrases.append(f"{article} {size}{spec.colour} {spec.shape}{position}")
        phrases.append(f"a {size}{spec.shape} in {spec.colour}{position}")
    return phrases


def captions_for(prompt: PromptSpec) -> list[str]:
    """All phrasings of `prompt`, in a fixed order (deterministic, no randomness)."""
    if len(prompt.objects) == 1:
        phrases = _object_phrases(prompt.objects[0])
        return phrases + [f"a picture of {p}" for p in phrases[:2]]
    first, second = (ObjectSpec(o.shape, o.colour) for o in prompt.objects)
    left, right = f"a {first.colour} {first.shape}", f"a {second.colour} {second.shape}"
    if prompt.relation is None:
        return [f"{left} and {right}", f"{left} next to {right}"]
    return [f"{left} {phrase} {right}" for phrase in RELATION_PHRASES[prompt.relation]]


def all_specs(objects: int) -> list[PromptSpec]:
    """Every spec with `objects` objects: one object with optional size and position; two objects of different
    colours (no size or position words) with an optional relation."""
    if objects == 1:
        choices = itertools.product(SHAPES, PALETTE, (None, *SIZES), (None, *POSITIONS))
        return [PromptSpec((ObjectSpec(shape, colour, size, position),)) for shape, colour, size, position in choices]
    if objects == 2:
        pairs = [(a, b) for a, b in itertools.product(itertools.product(SHAPES, PALETTE), repeat=2) if a[1] != b[1]]
        return [PromptSpec((ObjectSpec(*a), ObjectSpec(*b)), relation)
                for (a, b), relation in itertools.product(pairs, (None, *RELATIONS))]
    raise ValueError(f"objects must be 1 or 2, got {objects}")


def canonical(prompt: PromptSpec) -> str:
    """A stable text key of a spec (used for the held-out hash)."""
    parts = [f"{o.size or '-'}/{o.colour}/{o.shape}/{o.position or '-'}" for o in prompt.objects]
    return " | ".join(parts) + f" | {prompt.relation or '-'}"


def is_heldout(prompt: PromptSpec, percent: int = HELDOUT_PERCENT) -> bool:
    """Whether `prompt` belongs to the held-out split (deterministic: sha256 of its canonical form)."""
    return int(hashlib.sha256(canonical(prompt).encode()).hexdigest()[:8], 16) % 100 < percent


def caption_set(objects: int, split: str, percent: int = HELDOUT_PERCENT) -> list[tuple[str, PromptSpec]]:
    """(caption, spec) pairs of the `train` or `heldout` split for one- or two-object prompts, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [(caption, spec) for spec in all_specs(objects) if is_heldout(spec, percent) == want
            for caption in captions_for(spec)]


_COLOUR = "|".join(PALETTE)
_SHAPE = "|".join(SHAPES)
_SIZE = {word: size for size, words in SIZE_WORDS.items() for word in words}
_POSITION = {phrase: position for position, phrases in POSITION_PHRASES.items() for phrase in phrases}
_RELATION = {phrase: relation for relation, phrases in RELATION_PHRASES.items() for phrase in phrases}


def _parse_object(text: str, caption: str) -> ObjectSpec:
    colours = re.findall(rf"\b({_COLOUR})\b", text)
    shapes = re.findall(rf"\b({_SHAPE})\b", text)
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"caption {caption!r}: {text!r} must name exactly one colour and one shape, "
                         f"found colours {colours} and shapes {shapes}")
    sizes = [_SIZE[w] for w in re.findall(rf"\b({'|'.join(_SIZE)})\b", text)]
    phrases = sorted(_POSITION, key=len, reverse=True)
    positions = [_POSITION[p] for p in re.findall(rf"\b({'|'.join(phrases)})\b", text)]
    return ObjectSpec(shapes[0], colours[0], sizes[0] if sizes else None, positions[0] if positions else None)


def parse_caption(caption: str) -> PromptSpec:
    """Caption text -> PromptSpec (inverse of `captions_for`); ValueError naming the caption when it cannot."""
    text = caption.lower().strip()
    phrases = sorted(_RELATION, key=len, reverse=True)
    match = re.search(rf"\b({'|'.join(phrases)})\b", text)
    if match:
        parts, relation = (text[:match.start()], text[match.end():]), _RELATION[match.group(1)]
    else:
        relation = None
        split = re.split(r"\b(?:and|next to)\b", text, maxsplit=1)
        parts = tuple(split) if len(split) == 2 else (text,)
    return PromptSpec(tuple(_parse_object(part, caption) for part in parts), relation)
