"""Opening images: every PIL mode becomes the RGB the tower expects; bad files are clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import InputError
from retrieval.model.imaging import open_image, to_rgb


def test_transparent_rgba_is_composited_over_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgb = np.asarray(to_rgb(image))
    assert tuple(rgb[1, 1]) == (255, 255, 255)
    assert tuple(rgb[0, 0]) == (0, 0, 255)


def test_half_transparent_la() -> None:
    rgb = np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 128))))
    assert 125 <= rgb[0, 0, 0] <= 129  # black at 50% over white is mid grey


def test_palette_with_transparency() -> None:
    image = Image.new("P", (2, 2), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    image.putpixel((1, 1), 1)
    rgb = np.asarray(to_rgb(image))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[1, 1]) == (255, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.array([[0, 32768], [65535, 16384]], dtype=np.uint16))
    assert image.mode.startswith("I;16")
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0, 0] == 0 and rgb[1, 0, 0] == 255
    assert 126 <= rgb[0, 1, 0] <= 129


def test_cmyk_and_greyscale() -> None:
    assert to_rgb(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).mode == "RGB"
    assert np.asarray(to_rgb(Image.new("L", (3, 3), 7)))[0, 0].tolist() == [7, 7, 7]


def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    r, g, b = np.asarray(open_image(path))[4, 4]
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert open_image(path).size == (20, 40)


@pytest.mark.parametrize(
    ("content", "name"),
    [
        (b"", "empty.jpg"),
        (b"GIF89a", "header-only.gif"),
        (b"just text", "text.png"),
    ],
)
def test_undecodable_files(tmp_path: Path, content: bytes, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=name):
        open_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="cut.jpg"):
        open_image(cut)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(InputError, match="exceeds the 10,000-pixel limit"):
        open_image(path, max_pixels=10_000)
    assert open_image(path, max_pixels=60_000).size == (300, 200)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.jpg"):
        open_image(tmp_path / "missing.jpg")
