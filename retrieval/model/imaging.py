"""Opening images and turning any PIL mode into the RGB the image tower expects.

``Image.convert("RGB")`` alone gets several real-world modes wrong: transparent pixels keep
whatever colour they store (often black), 16-bit greyscale is clipped instead of scaled, and a
phone photo stays sideways without its EXIF orientation. This module does each of those right.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from retrieval.errors import InputError

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "open_image", "to_rgb"]

# Just under Pillow's own decompression-bomb error (2 x MAX_IMAGE_PIXELS): 13k x 13k, enough for
# scans and panoramas, and about 0.5 GB decoded.
DEFAULT_MAX_PIXELS = 178_000_000
_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image``: alpha composited over white, 16-bit and float scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        has_alpha = "transparency" in image.info or (
            image.palette is not None and image.palette.mode == "RGBA"
        )
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # Scale by the mode's range rather than clip: 16-bit data spans 0..65535.
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
    if image.mode == "I" and top <= 255:
        top = 255.0
    scaled = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` into an upright RGB image (first frame of an animation).

    Raises ``InputError`` for a missing, unreadable or truncated file, or one above
    ``max_pixels`` (checked from the header, before the pixels are decoded).
    """
    return _decode(Path(path), str(path), max_pixels)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """``open_image`` for an encoded image held in memory (an upload); ``name`` labels its errors."""
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # The limit is ours (max_pixels): Pillow's softer warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(f"{name}: {width}x{height} exceeds the {max_pixels:,}-pixel limit")
                image.seek(0)
                image.load()
                upright = ImageOps.exif_transpose(image)
                return to_rgb(upright if upright is not None else image)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: exceeds the pixel limit: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{name}: cannot decode image: {e}") from e
