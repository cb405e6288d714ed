"""PNG grids of ShapesWorld images with their captions (and, optionally, the checker's verdict as a border)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

VERDICT_COLOURS = {True: (40, 170, 60), False: (210, 40, 40)}


def to_pil(image: Tensor, scale: int) -> Image.Image:
    """(3, R, R) in [-1, 1] -> an RGB PIL image of side R·scale (nearest-neighbour, so pixels stay visible)."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, R, R)
    picture = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def caption_grid(images: Tensor, captions: list[str], path: str | Path, columns: int = 8, scale: int = 3,
                 verdicts: list[bool] | Tensor | None = None, title: str | None = None) -> Path:
    """Write a PNG: `images` (B, 3, R, R) in [-1, 1] in rows of `columns`, each with its caption wrapped below it
    and, with `verdicts`, a green (correct) or red (wrong) border. Returns the path."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"caption_grid: images must be (B, 3, R, R), got {tuple(images.shape)}")
    if len(captions) != images.shape[0] or (verdicts is not None and len(verdicts) != images.shape[0]):
        raise ValueError(f"caption_grid: {images.shape[0]} images, {len(captions)} captions"
                         + (f", {len(verdicts)} verdicts" if verdicts is not None else ""))
    side = images.shape[-1] * scale
    border, chars = 3, max(8, side // 6)
    wrapped = [textwrap.wrap(caption, chars)[:4] for caption in captions]
    text_h = 11 * max((len(lines) for lines in wrapped), default=1) + 4
    cell_w, cell_h = side + 2 * border + 6, side + 2 * border + text_h + 4
    title_h = 18 if title else 0
    columns = max(1, min(columns, len(captions)))
    rows = -(-len(captions) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h + title_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black")
    for index, (image, lines) in enumerate(zip(images, wrapped)):
        row, column = divmod(index, columns)
        x, y = column * cell_w + 3, row * cell_h + title_h + 2
        if verdicts is not None:
            draw.rectangle([x, y, x + side + 2 * border - 1, y + side + 2 * border - 1],
                           fill=VERDICT_COLOURS[bool(verdicts[index])])
        sheet.paste(to_pil(image, scale), (x + border, y + border))
        for line_index, line in enumerate(lines):
            draw.text((x, y + side + 2 * border + 2 + 11 * line_index), line, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
