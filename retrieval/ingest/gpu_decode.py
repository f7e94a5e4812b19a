"""JPEGs decoded on the GPU in batches (nvJPEG through torchvision), resized there as the processor
resizes on the CPU (docs/decisions/0007-gpu-jpeg-decoding.md).

The CPU workers read and hash each file and keep as bytes the JPEGs nvJPEG takes
(``ingest.decoding.decode_or_keep``); this module turns a batch of those into the model's uint8
pixels on the device. Resizing is torch's antialiased interpolation with the processor's filter
(bilinear or bicubic: the filters PIL and torch compute alike), rounded to uint8 as PIL's result
is, so that both paths feed ``ImagePreprocess.normalize`` the same kind of pixels. A batch nvJPEG
refuses is decoded again file by file, and a file it refuses alone is handed back to be decoded on
the CPU: one odd file costs only itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.model.preprocess import ImagePreprocess

__all__ = ["BatchDecoder", "GpuJpegDecoder", "gpu_decoding_problem", "nvjpeg"]

# PIL's filters that torch's antialiased interpolation computes alike (PIL codes: 2, 3).
_MODES = {2: "bilinear", 3: "bicubic"}

BatchDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]
"""Encoded JPEGs (uint8 1-D tensors on the CPU) -> decoded images, uint8 (3, H, W) on the device."""


def nvjpeg(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched nvJPEG decode, to RGB (greyscale JPEGs expanded)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


def gpu_decoding_problem(preprocess: ImagePreprocess, device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` for this processor (None: they can)."""
    if device.type != "cuda":
        return "the model is not on a CUDA GPU"
    if preprocess.do_resize and preprocess.resample not in _MODES:
        return f"the processor's resample filter ({preprocess.resample}) has no GPU equivalent"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return "torchvision is not installed (install the build that matches torch)"
    return None


class GpuJpegDecoder:
    """Batches of JPEG bytes -> the model's uint8 (n, H, W, 3) pixels on ``device``.

    ``decode_batch`` is nvJPEG by default; another (a CPU stand-in in tests) takes its place.
    Not safe to share between threads (one build feeds one).
    """

    def __init__(
        self, preprocess: ImagePreprocess, device: torch.device, decode_batch: BatchDecoder = nvjpeg
    ) -> None:
        self.preprocess = preprocess
        self.device = device
        self.decode_batch = decode_batch
        self.mode = _MODES.get(preprocess.resample, "bilinear")

    def decode(self, datas: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        """-> (pixels of the files decoded, in order, uint8 (n, H, W, 3) on the device; the
        positions in ``datas`` of those refused, to be decoded on the CPU)."""
        encoded = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for data in datas]
        try:
            images: list[torch.Tensor | None] = list(self.decode_batch(encoded, self.device))
            if len(images) != len(encoded):
                raise RuntimeError(f"{len(images)} images decoded from {len(encoded)} files")
        except Exception:  # one bad file fails nvJPEG's whole batch: each again, alone
            images = [self._alone(x) for x in encoded]
        pixels, refused = [], []
        for k, image in enumerate(images):
            resized = self._resized(image) if image is not None else None
            if resized is None:
                refused.append(k)
            else:
                pixels.append(resized)
        h, w = self.preprocess.height, self.preprocess.width
        if not pixels:
            return torch.empty((0, h, w, 3), dtype=torch.uint8, device=self.device), refused
        return torch.stack(pixels), refused

    def _alone(self, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            return self.decode_batch([encoded], self.device)[0]
        except Exception:
            return None

    def _resized(self, image: torch.Tensor) -> torch.Tensor | None:
        """uint8 (3, h, w) -> uint8 (H, W, 3) as the processor resizes; None for an image it cannot use."""
        h, w = self.preprocess.height, self.preprocess.width
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            return None
        if (image.shape[1], image.shape[2]) == (h, w) or not self.preprocess.do_resize:
            return image.permute(1, 2, 0) if image.shape[1:] == (h, w) else None
        x = image.unsqueeze(0).float()  # (1, 3, h, w)
        y = F.interpolate(x, size=(h, w), mode=self.mode, antialias=True, align_corners=False)
        return y.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
