"""A contact sheet: image results as a grid of thumbnails, each with its rank and score."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from retrieval.durable import atomic_write
from retrieval.errors import InputError
from retrieval.imaging import open_image

__all__ = ["contact_sheet"]

_CAPTION = 18


def contact_sheet(
    items: Sequence[tuple[str, str]], out: Path, *, thumb: int = 192, columns: int = 5, title: str = ""
) -> Path:
    """Write a PNG grid of ``(path, label)`` images to ``out``; unreadable images become grey tiles."""
    if not items:
        raise InputError("no images to draw")
    columns = max(1, min(columns, len(items)))
    rows = (len(items) + columns - 1) // columns
    top = _CAPTION if title else 0
    sheet = Image.new("RGB", (columns * thumb, top + rows * (thumb + _CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black")
    for i, (path, label) in enumerate(items):
        x, y = (i % columns) * thumb, top + (i // columns) * (thumb + _CAPTION)
        try:
            image = ImageOps.contain(open_image(path), (thumb - 8, thumb - 8))
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except InputError:
            draw.rectangle((x + 4, y + 4, x + thumb - 4, y + thumb - 4), fill="#ccc")
        draw.text((x + 4, y + thumb + 2), label, fill="black")
    out = Path(out)
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
    return out
