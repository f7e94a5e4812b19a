"""The checkpoint's preprocessing, split so that the heavy part runs anywhere and stays small.

Images: ``ImagePreprocess`` reads the tower folder's image processor config and does what it
does (resize to ``size`` with its ``resample``, rescale, normalize), in two halves:

- ``to_pixels`` (CPU, any worker): RGB image -> resized ``uint8`` array (H, W, 3);
- ``normalize`` (on the model's device): uint8 (B, H, W, 3) -> float32 (B, 3, H, W).

Moving uint8 instead of float32 to the GPU is a quarter of the bytes, and the arithmetic is the
processor's own: ``(x * rescale_factor - mean) / std``.

Texts: ``TextBatcher`` tokenizes once, sorts by length and pads each batch to its own longest
caption, so a batch of short captions is not padded to the longest caption in the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.errors import ModelError

__all__ = ["ImagePreprocess", "TextBatch", "TextBatcher"]

_PIL_FILTERS = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}
# Processor options that change pixels and that ImagePreprocess does not reproduce.
_UNSUPPORTED = ("do_center_crop", "do_pad", "do_reduce_labels")


@dataclass(frozen=True)
class ImagePreprocess:
    """What the image processor does, as plain values (also hashed into the model fingerprint)."""

    height: int
    width: int
    resample: int = 2  # PIL's BILINEAR, ViT's default
    do_resize: bool = True
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_normalize: bool = True

    @classmethod
    def from_processor(cls, processor: Any) -> ImagePreprocess:
        """Read a transformers image processor (ViT style: ``size`` with height and width)."""
        config = processor.to_dict() if hasattr(processor, "to_dict") else dict(vars(processor))
        size = config.get("size") or {}
        if not isinstance(size, dict) or "height" not in size or "width" not in size:
            raise ModelError(
                f"image processor size {size!r} is not supported; expected {{'height': H, 'width': W}}"
            )
        for option in _UNSUPPORTED:
            if config.get(option):
                raise ModelError(f"image processor option {option}=True is not supported")
        resample = int(config.get("resample", 2))
        if resample not in _PIL_FILTERS:
            raise ModelError(f"image processor resample={resample} is not a PIL filter")
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=resample,
            do_resize=bool(config.get("do_resize", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_rescale=bool(config.get("do_rescale", True)),
            mean=_triple(config.get("image_mean", 0.5)),
            std=_triple(config.get("image_std", 0.5)),
            do_normalize=bool(config.get("do_normalize", True)),
        )

    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """RGB image -> uint8 (height, width, 3), resized as the processor resizes."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        if self.do_resize and image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=_PIL_FILTERS[self.resample])
        return np.asarray(image, dtype=np.uint8)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> float32 (B, 3, H, W), the tower's ``pixel_values``.

        One copy into a contiguous float tensor, then ``x * (scale / std) - mean / std`` in place:
        the processor's arithmetic folded into one multiply-add per pixel (a few times faster than
        the step-by-step form on a CPU, and equal to float32 rounding).
        """
        b, h, w, _ = pixels.shape
        x = torch.empty((b, 3, h, w), dtype=torch.float32, device=pixels.device)
        x.copy_(pixels.permute(0, 3, 1, 2))
        scale = self.rescale_factor if self.do_rescale else 1.0
        if not self.do_normalize:
            return x.mul_(scale)
        std = torch.tensor(self.std, dtype=torch.float64)
        gain = (scale / std).to(torch.float32).view(1, 3, 1, 1).to(x.device)
        shift = (torch.tensor(self.mean, dtype=torch.float64) / std).to(torch.float32).view(1, 3, 1, 1)
        return x.mul_(gain).sub_(shift.to(x.device))


def _triple(value: Any) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ModelError(f"image mean/std must have 3 channels, got {value!r}")
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class TextBatch:
    """Padded token ids for one batch, and where each row goes in the caller's order."""

    positions: np.ndarray  # (B,) int64 indices into the input sequence
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    token_type_ids: torch.Tensor  # (B, T) int64

    def inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


class TextBatcher:
    """Tokenize like the seed (``truncation=True``) and batch by length.

    The maximum length is the tokenizer's ``model_max_length``, capped by the tower's position
    embeddings so that a tokenizer config without a limit cannot overflow the model.
    """

    def __init__(self, tokenizer: Any, max_positions: int) -> None:
        self.tokenizer = tokenizer
        limit = int(getattr(tokenizer, "model_max_length", max_positions) or max_positions)
        self.max_length = min(limit, int(max_positions))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @classmethod
    def for_model(cls, model: Any) -> TextBatcher:
        """The batcher of a ``MultiModalEncoder``: its tokenizer, capped by its text tower."""
        positions = int(getattr(model.text_encoder.config, "max_position_embeddings", 512))
        return cls(model.text_tokenizer, positions)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, with special tokens, truncated to ``max_length``."""
        return self.tokenize_flagged(texts)[0]

    def tokenize_flagged(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids as ``tokenize`` makes them, and which texts were truncated (bool (n,)).

        Texts are tokenized whole and cut here: the result equals ``truncation=True`` for a
        single sequence (the last special token is kept), and the cut is known.
        """
        if not texts:
            return [], np.zeros(0, dtype=bool)
        encoded = self.tokenizer(
            list(texts),
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        ids = list(encoded["input_ids"])
        truncated = np.fromiter((len(t) > self.max_length for t in ids), dtype=bool, count=len(ids))
        for i in np.flatnonzero(truncated):
            ids[i] = [*ids[i][: self.max_length - 1], ids[i][-1]]
        return ids, truncated

    def batches(self, texts: Sequence[str], batch_size: int) -> Iterator[TextBatch]:
        """Tokenize ``texts`` and batch them by length (see ``batches_from_ids``)."""
        return self.batches_from_ids(self.tokenize(texts), batch_size)

    def batches_from_ids(self, ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[TextBatch]:
        """Longest batches first (a memory problem shows at once), each padded to its own max."""
        lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            positions = order[start : start + batch_size]
            yield self.pad([ids[i] for i in positions], positions)

    def pad(self, ids: Sequence[Sequence[int]], positions: np.ndarray | None = None) -> TextBatch:
        """One batch of token ids, in the given order, padded to its longest."""
        width = max((len(t) for t in ids), default=0)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return TextBatch(
            positions=np.arange(len(ids)) if positions is None else positions,
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.zeros_like(torch.from_numpy(input_ids)),
        )
