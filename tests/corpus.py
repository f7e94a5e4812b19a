"""A small real-world image folder made on the spot: every mode, and every kind of bad file."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

GOOD = [
    "clipart/flag.png",  # RGBA with transparency
    "clipart/palette.png",  # P with a transparent index
    "clipart/grey-alpha.png",  # LA
    "photos/cmyk.jpg",
    "photos/rotated.jpg",  # EXIF orientation 6
    "photos/big.jpg",  # reduced on load
    "photos/deep.png",  # 16-bit greyscale
    "anim.gif",
    "scan.tiff",
    "pic.bmp",
    "pic.webp",
    "nested/deeper/leaf.jpeg",
    "duplicate-of-leaf.jpeg",
]
BAD = {
    "broken/truncated.jpg": "decode",
    "broken/empty.png": "decode",
    "broken/html.jpg": "decode",
    "broken/bomb.png": "decode",
}
SKIPPED = {"links/outside.jpg", "links/loop", "fifo.jpg"}


def _picture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(coarse)


def _bomb_png() -> bytes:
    """A valid PNG header declaring 50,000 x 50,000 pixels, with almost no data."""
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def make_corpus(root: Path, outside: Path, seed: int = 0) -> Path:
    """Write the corpus under ``root``; ``outside`` is a folder beside it for the escaping symlink."""
    rng = np.random.default_rng(seed)
    for name in ("clipart", "photos", "nested/deeper", "broken", "links"):
        (root / name).mkdir(parents=True, exist_ok=True)

    rgba = np.concatenate([_picture(rng, 60, 40), np.full((40, 60, 1), 255, np.uint8)], axis=2)
    rgba[:10, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "clipart/flag.png")
    palette = Image.fromarray(_picture(rng, 30, 30)).convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.save(root / "clipart/palette.png", transparency=0)
    Image.fromarray(
        np.stack([_picture(rng, 20, 20)[..., 0], np.full((20, 20), 128, np.uint8)], -1), "LA"
    ).save(root / "clipart/grey-alpha.png")
    Image.fromarray(_picture(rng, 40, 30)).convert("CMYK").save(root / "photos/cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_picture(rng, 64, 32)).save(root / "photos/rotated.jpg", exif=exif)
    Image.fromarray(_picture(rng, 400, 300)).save(root / "photos/big.jpg", quality=90)
    Image.fromarray(_picture(rng, 30, 30)[..., 0].astype(np.uint16) * 257).save(root / "photos/deep.png")
    frames = [Image.fromarray(_picture(rng, 24, 24)) for _ in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=40)
    Image.fromarray(_picture(rng, 30, 20)).save(root / "scan.tiff")
    Image.fromarray(_picture(rng, 30, 20)).save(root / "pic.bmp")
    Image.fromarray(_picture(rng, 30, 20)).save(root / "pic.webp")
    Image.fromarray(_picture(rng, 50, 50)).save(root / "nested/deeper/leaf.jpeg")
    (root / "duplicate-of-leaf.jpeg").write_bytes((root / "nested/deeper/leaf.jpeg").read_bytes())

    buffer = io.BytesIO()
    Image.fromarray(_picture(rng, 80, 80)).save(buffer, "JPEG")
    (root / "broken/truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "broken/empty.png").write_bytes(b"")
    (root / "broken/html.jpg").write_text("<!doctype html><html><body>not found</body></html>")
    (root / "broken/bomb.png").write_bytes(_bomb_png())

    outside.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_picture(rng, 20, 20)).save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", root / "links/outside.jpg")
    os.symlink(root, root / "links/loop")  # a cycle back to the root
    os.mkfifo(root / "fifo.jpg")

    (root / "clipart/flag.txt").write_text("\ufeffa red flag on a white pole\n", encoding="utf-8")
    (root / "pic.txt").write_bytes(b"caption with \xff\xfe invalid bytes")
    (root / "scan.txt").write_text("   \n")
    (root / "notes.txt").write_text("not a sidecar: no image has this stem")
    return root
