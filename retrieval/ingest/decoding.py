"""One image file: read, hashed, checked, and decoded to the model's pixels here, or kept as JPEG
bytes where the GPU can decode it (``ingest.gpu_decode``).

Big JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, ``Image.draft``) when the image
is at least twice the model's input in both sides after reduction, which keeps the result within
the reference path's tolerance while decoding several times faster.

What the GPU decoder takes: baseline JPEGs in RGB or greyscale with no EXIF rotation. Progressive
and CMYK JPEGs, rotated photos and every other format are decoded here.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.model.imaging import DEFAULT_MAX_PIXELS, to_rgb
from retrieval.model.preprocess import ImagePreprocess
from retrieval.outcomes import Reason

__all__ = [
    "DecodeError",
    "Decoded",
    "Decoder",
    "GpuJpeg",
    "decode_bytes",
    "decode_file",
    "decode_or_keep",
    "jpeg_for_gpu",
]

_ORIENTATION = 0x0112  # the EXIF tag


class DecodeError(ValueError):
    """A file that cannot be used, with the reason code its outcome carries."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class GpuJpeg:
    """A JPEG read and hashed here, its pixels left to the GPU."""

    sha256: str
    width: int
    height: int
    data: bytes


def decode_file(
    path: Path, preprocess: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[str, int, int, np.ndarray, bool]:
    """Read, hash and decode one file -> (sha256, width, height, pixels (H, W, 3) uint8, reduced).

    Raises ``DecodeError`` (a ``ValueError``) with a reason code and a readable reason for anything
    unusable.
    """
    data, digest = _read(path)
    width, height, pixels, reduced = decode_bytes(data, preprocess, max_pixels)
    return digest, width, height, pixels, reduced


Decoded = tuple[str, int, int, np.ndarray, bool]  # sha256, width, height, pixels (H, W, 3) uint8, reduced
Decoder = Callable[[Path, ImagePreprocess, int], Decoded]


def decode_bytes(
    data: bytes, preprocess: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int, np.ndarray, bool]:
    """An encoded image -> (width, height, pixels (H, W, 3) uint8, reduced); ``DecodeError`` if unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pixel limit is ours; Pillow's warnings are noise here
        image = _open(data, max_pixels)
        width, height = image.size
        reduced = False
        if image.format == "JPEG" and preprocess.do_resize:
            wanted = (2 * preprocess.width, 2 * preprocess.height)
            if width >= 2 * wanted[0] and height >= 2 * wanted[1]:
                image.draft("RGB", wanted)
                reduced = image.size != (width, height)
        try:
            image.seek(0)
            image.load()
        except Exception as e:
            raise DecodeError(Reason.UNDECODABLE, f"cannot decode: {e}") from e
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
        rgb = to_rgb(image)
    if not preprocess.do_resize and rgb.size != (preprocess.width, preprocess.height):
        takes = f"{preprocess.width}x{preprocess.height}"
        raise DecodeError(Reason.WRONG_SIZE, f"is {rgb.size[0]}x{rgb.size[1]}, the model takes {takes}")
    return width, height, preprocess.to_pixels(rgb), reduced


def decode_or_keep(
    path: Path, preprocess: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS
) -> GpuJpeg | Decoded:
    """``decode_file``, except that a JPEG the GPU decoder takes is only read and hashed: the file
    is read once either way. Raises ``DecodeError`` as ``decode_file`` does."""
    data, digest = _read(path)
    jpeg = _for_gpu(data, digest, preprocess, max_pixels)
    if jpeg is not None:
        return jpeg
    width, height, pixels, reduced = decode_bytes(data, preprocess, max_pixels)
    return digest, width, height, pixels, reduced


def jpeg_for_gpu(
    path: Path, preprocess: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS
) -> GpuJpeg | None:
    """``path`` read and hashed, if its header says the GPU decoder takes it; else None (decode it
    here). Raises ``DecodeError`` for a file that cannot be read or is over the pixel limit."""
    data, digest = _read(path)
    return _for_gpu(data, digest, preprocess, max_pixels)


def _for_gpu(data: bytes, digest: str, preprocess: ImagePreprocess, max_pixels: int) -> GpuJpeg | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = _open(data, max_pixels)
        except DecodeError as e:
            if e.code == Reason.TOO_LARGE:
                raise
            return None  # not an image it knows: decoding here says why
        width, height = image.size
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        if image.info.get("progressive") or image.info.get("progression"):
            return None
        if image.getexif().get(_ORIENTATION, 1) != 1:
            return None
    if not preprocess.do_resize and (width, height) != (preprocess.width, preprocess.height):
        return None
    return GpuJpeg(digest, width, height, data)


def _read(path: Path) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DecodeError(Reason.UNREADABLE, f"cannot read: {e.strerror or e}") from e
    if not data:
        raise DecodeError(Reason.EMPTY, "empty file (0 bytes)")
    return data, hashlib.sha256(data).hexdigest()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header parsed (pixels not decoded yet), checked against ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # declared size beyond Pillow's own hard limit
        why = f"too many pixels (decompression bomb?): {str(e).split(', could')[0]}"
        raise DecodeError(Reason.TOO_LARGE, why) from e
    except UnidentifiedImageError as e:
        raise DecodeError(Reason.NOT_AN_IMAGE, "not an image in a known format") from e
    except Exception as e:
        raise DecodeError(Reason.UNDECODABLE, f"not a readable image: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(Reason.TOO_LARGE, f"{width}x{height} exceeds the {max_pixels:,}-pixel limit")
    return image
