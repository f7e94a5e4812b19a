"""JPEGs for the GPU: which files go there, the batch decoder's resize and fallbacks, and a build
through that path. Without a GPU, nvJPEG's place is taken by a CPU stand-in (Pillow's decode into a
tensor), so everything but nvJPEG itself runs here; the real decoder is tested behind ``cuda``."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stores import live

from retrieval import BuildConfig, Encoder, build_index
from retrieval.build.execute import LocalExecutor
from retrieval.errors import ConfigError
from retrieval.ingest.decoding import DecodeError, decode_file, jpeg_for_gpu
from retrieval.ingest.gpu_decode import GpuJpegDecoder, gpu_decoding_problem
from retrieval.ingest.reader import read_images
from retrieval.ingest.sources import ImageFile
from retrieval.model.preprocess import ImagePreprocess
from retrieval.outcomes import Reason
from retrieval.vectors import embedding_matrix

CPU = torch.device("cpu")


def picture(rng: np.random.Generator, w: int = 96, h: int = 72) -> Image.Image:
    """Smooth colour fields with grain: photo-like, so resize differences show as they would."""
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def pil_decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG's stand-in: a whole batch fails if one file does, as nvJPEG's batched decode does."""
    out = []
    for data in encoded:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            rgb = np.asarray(image.convert("RGB"))
        out.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device))
    return out


def refusing(marker: bytes) -> Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]:
    """A stand-in that, like nvJPEG with an odd file, fails any batch holding a file with ``marker``."""

    def decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if any(marker in data.numpy().tobytes() for data in encoded):
            raise RuntimeError("nvjpeg: unsupported")
        return pil_decode(encoded, device)

    return decode


# -- which files go to the GPU ----------------------------------------------------------------------


def test_baseline_jpegs_go_to_the_gpu_and_the_rest_stay(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = picture(rng)
    files = {
        "rgb.jpg": lambda p: image.save(p, quality=90),
        "grey.jpg": lambda p: image.convert("L").save(p),
        "progressive.jpg": lambda p: image.save(p, progressive=True),
        "cmyk.jpg": lambda p: image.convert("CMYK").save(p),
        "rotated.jpg": lambda p: image.save(p, exif=_rotated_exif()),
        "photo.png": lambda p: image.save(p),
        "text.jpg": lambda p: p.write_text("not an image"),
    }
    for name, write in files.items():
        write(tmp_path / name)
    preprocess = ImagePreprocess(32, 32)
    kept = {name: jpeg_for_gpu(tmp_path / name, preprocess) for name in files}
    assert {name for name, jpeg in kept.items() if jpeg is not None} == {"rgb.jpg", "grey.jpg"}
    rgb = kept["rgb.jpg"]
    assert rgb is not None and (rgb.width, rgb.height) == (96, 72)
    assert rgb.data == (tmp_path / "rgb.jpg").read_bytes()
    assert rgb.sha256 == decode_file(tmp_path / "rgb.jpg", preprocess)[0]
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DecodeError) as empty:
        jpeg_for_gpu(tmp_path / "empty.jpg", preprocess)
    assert empty.value.code == Reason.EMPTY
    with pytest.raises(DecodeError) as big:
        jpeg_for_gpu(tmp_path / "rgb.jpg", preprocess, max_pixels=1000)
    assert big.value.code == Reason.TOO_LARGE


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def test_the_gpu_needs_cuda_torchvision_and_a_filter_it_computes_alike() -> None:
    assert "CUDA" in (gpu_decoding_problem(ImagePreprocess(32, 32), CPU) or "")
    lanczos = ImagePreprocess(32, 32, resample=1)
    assert "resample filter" in (gpu_decoding_problem(lanczos, torch.device("cuda")) or "")


# -- the batch decoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("resample", [2, 3])  # bilinear, bicubic
def test_resizing_on_the_device_matches_the_processors_resize(resample: int) -> None:
    rng = np.random.default_rng(1)
    preprocess = ImagePreprocess(32, 32, resample=resample)
    images = [picture(rng, w, h) for w, h in ((96, 72), (40, 300), (33, 31), (32, 32), (20, 24))]
    datas = [_jpeg(im) for im in images]
    pixels, refused = GpuJpegDecoder(preprocess, CPU, pil_decode).decode(datas)
    assert refused == [] and pixels.shape == (5, 32, 32, 3) and pixels.dtype == torch.uint8
    for k, data in enumerate(datas):
        reference = preprocess.to_pixels(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        diff = np.abs(pixels[k].numpy().astype(int) - reference)
        assert diff.max() <= 3 and diff.mean() < 0.6, (k, diff.max(), diff.mean())


def test_a_batch_with_an_odd_file_is_decoded_file_by_file() -> None:
    rng = np.random.default_rng(2)
    preprocess = ImagePreprocess(32, 32)
    datas = [_jpeg(picture(rng)) for _ in range(4)]
    datas[2] = datas[2][:400] + b"ODD" + datas[2][400:]
    pixels, refused = GpuJpegDecoder(preprocess, CPU, refusing(b"ODD")).decode(datas)
    assert refused == [2] and pixels.shape[0] == 3
    alone, _ = GpuJpegDecoder(preprocess, CPU, pil_decode).decode([datas[3]])
    torch.testing.assert_close(pixels[2], alone[0])  # the fourth file is the third decoded
    nothing, refused = GpuJpegDecoder(preprocess, CPU, refusing(b"\xff\xd8")).decode(datas[:2])
    assert nothing.shape == (0, 32, 32, 3) and refused == [0, 1]


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, **options)
    return buffer.getvalue()


# -- a build with JPEGs on the "GPU" ----------------------------------------------------------------


def test_a_build_decodes_jpegs_on_the_device_and_records_which(config: BuildConfig, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(6):
        picture(rng, 60 + 7 * i, 50).save(folder / f"photo{i}.jpg", quality=90)
    picture(rng).save(folder / "scan.png")
    picture(rng).save(folder / "progressive.jpg", progressive=True)
    (folder / "odd.jpg").write_bytes(_jpeg(picture(rng)).replace(b"JFIF", b"JFIF", 1) + b"ODD")
    damaged = _jpeg(picture(rng))
    (folder / "damaged.jpg").write_bytes(damaged[:300] + b"ODD" + bytes(200))  # header fine, body not
    target = BuildConfig(
        out=tmp_path / "gpu-index", images=folder, model=config.model, device="cpu", workers=2
    )
    with Encoder.load(config.model, device="cpu") as encoder:
        decoder = GpuJpegDecoder(encoder.preprocess, CPU, refusing(b"ODD"))
        executor = LocalExecutor(encoder, folder, workers=2, gpu_decoder=decoder)
        report = build_index(target, encoder=encoder, executor=executor)
        rows = live(target.out, "images")
        paths = rows.column("path").to_pylist()
        flags = dict(zip(paths, rows.column("flags").to_pylist(), strict=True))
        assert sorted(paths) == sorted(
            [f"photo{i}.jpg" for i in range(6)] + ["scan.png", "progressive.jpg", "odd.jpg"]
        )
        assert {p for p, f in flags.items() if "gpu_decoded" in f} == {f"photo{i}.jpg" for i in range(6)}
        assert "gpu_decoded" not in flags["odd.jpg"]  # refused on the device, decoded on the CPU
        images = report.collections["images"]
        assert images.failed == 1 and images.encoded == 9
        stored = embedding_matrix(rows.column("embedding"), 16)
        reference = encoder.encode_images([folder / p for p in paths])  # the CPU reference path
        assert np.sum(stored * reference, axis=1).min() >= 0.999
    assert images.stages[0].name == "decode" and images.stages[0].inputs == 10


def test_decode_gpu_without_one_is_a_clear_error(config: BuildConfig) -> None:
    with pytest.raises(ConfigError, match="cannot decode on the GPU: the model is set to run on the CPU"):
        build_index(
            BuildConfig(out=config.out, images=config.images, model=config.model, device="cpu", decode="gpu")
        )
    assert not config.out.exists()


@pytest.mark.cuda
@pytest.mark.skipif(
    gpu_decoding_problem(ImagePreprocess(32, 32), torch.device("cuda")) is not None, reason="needs nvJPEG"
)
def test_nvjpeg_pixels_and_vectors_match_the_cpu_path(config: BuildConfig, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    datas = [_jpeg(picture(rng, 64 + 9 * i, 48 + 5 * i)) for i in range(12)] + [
        _jpeg(picture(rng).convert("L"))
    ]
    with Encoder.load(config.model, device="cuda", precision="fp32") as encoder:
        pixels, refused = GpuJpegDecoder(encoder.preprocess, encoder.runtime.device).decode(datas)
        assert refused == [] and pixels.device.type == "cuda"
        reference = np.stack(
            [encoder.preprocess.to_pixels(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]
        )
        diff = np.abs(pixels.cpu().numpy().astype(int) - reference.astype(int))
        assert diff.mean() < 1.0
        cosines = np.sum(encoder.encode_pixels(pixels) * encoder.encode_pixels(reference), axis=1)
        assert cosines.min() >= 0.999


def test_the_gpu_route_takes_no_decoder_of_its_own(tmp_path: Path) -> None:
    picture(np.random.default_rng(5)).save(tmp_path / "a.jpg")
    files = [ImageFile("a.jpg", 1, 1)]
    with pytest.raises(ValueError, match="cannot be combined with gpu_jpegs"):
        list(read_images(tmp_path, files, ImagePreprocess(32, 32), workers=0, decode=_other, gpu_jpegs=True))
    (group,) = read_images(tmp_path, files, ImagePreprocess(32, 32), workers=0, gpu_jpegs=True)
    assert [image.index for image, _ in group.jpegs] == [0] and not group.images  # read once, kept


def _other(path: Path, preprocess: ImagePreprocess, max_pixels: int) -> tuple:
    return decode_file(path, preprocess, max_pixels)
