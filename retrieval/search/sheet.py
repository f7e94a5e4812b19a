"""A contact sheet: search results as a grid of tiles, thumbnails for images and wrapped text for
captions, each labelled with its rank, score and file name."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from retrieval.durable import atomic_write
from retrieval.errors import InputError
from retrieval.model.imaging import open_image

__all__ = ["Tile", "contact_sheet"]

_LINE = 12  # pixels per line of Pillow's default bitmap font
_LABEL_LINES = 2


@dataclass(frozen=True)
class Tile:
    """One result: an image file to draw (``image``) or a caption (``text``), and its label lines."""

    label: str
    image: str | None = None
    text: str | None = None


def contact_sheet(
    tiles: Sequence[Tile], out: Path, *, thumb: int = 192, columns: int = 5, title: str = ""
) -> Path:
    """Write a PNG grid of ``tiles`` to ``out``; an unreadable image becomes a grey tile."""
    if not tiles:
        raise InputError("no results to draw")
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    label_height = _LABEL_LINES * _LINE + 6
    top = _LINE + 6 if title else 0
    sheet = Image.new("RGB", (columns * thumb, top + rows * (thumb + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black")
    chars = max(8, (thumb - 8) // 6)  # the default font is about 6 pixels a character
    for i, tile in enumerate(tiles):
        x, y = (i % columns) * thumb, top + (i // columns) * (thumb + label_height)
        if tile.image is not None:
            try:
                image = ImageOps.contain(open_image(tile.image), (thumb - 8, thumb - 8))
                sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
            except InputError:
                draw.rectangle((x + 4, y + 4, x + thumb - 4, y + thumb - 4), fill="#ccc")
        else:
            draw.rectangle((x + 4, y + 4, x + thumb - 4, y + thumb - 4), outline="#bbb", fill="#f6f6f6")
            lines = textwrap.wrap(tile.text or "", chars)[: (thumb - 16) // _LINE]
            for n, line in enumerate(lines):
                draw.text((x + 10, y + 10 + n * _LINE), line, fill="black")
        for n, line in enumerate(textwrap.wrap(tile.label, chars)[:_LABEL_LINES]):
            draw.text((x + 4, y + thumb + 2 + n * _LINE), line, fill="black")
    out = Path(out)
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
    return out
