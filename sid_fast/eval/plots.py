"""Small PNG plots without matplotlib: 2-D scatter panels side by side."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def scatter_panels(panels: dict[str, torch.Tensor], path: str | Path, extent: float = 3.0, size: int = 280,
                   labels: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one PNG with a scatter panel per entry of `panels` ((n, 2) points), titled by its key."""
    title_h = 18
    image = Image.new("RGB", (size * len(panels), size + title_h), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels.items()):
        x0 = i * size
        draw.rectangle([x0, title_h, x0 + size - 1, title_h + size - 1], outline=(180, 180, 180))
        draw.text((x0 + 4, 3), title, fill="black")
        pts = points[:, :2].double()
        px = ((pts[:, 0] + extent) / (2 * extent) * (size - 1)).round().long() + x0
        py = ((extent - pts[:, 1]) / (2 * extent) * (size - 1)).round().long() + title_h
        colour_index = labels[title] if labels is not None and title in labels else None
        for j, (u, v) in enumerate(zip(px.tolist(), py.tolist())):
            if x0 <= u < x0 + size and title_h <= v < title_h + size:
                colour = COLOURS[int(colour_index[j]) % len(COLOURS)] if colour_index is not None else (31, 119, 180)
                draw.point((u, v), fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
