"""Choosing where and in what precision the model runs."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Literal

import torch

from retrieval.errors import ConfigError

__all__ = ["Precision", "Runtime", "resolve_runtime"]

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES: dict[Precision, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """A resolved device and precision. Weights stay float32; lower precision is autocast."""

    device: torch.device
    precision: Precision

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """``device``: auto | cpu | cuda | cuda:N. ``precision``: auto | fp32 | bf16 | fp16.

    ``auto`` means the first GPU if there is one, and there bf16 (fp16 on GPUs without bf16); on
    the CPU, fp32 (bf16 only on request: it is faster on CPUs with AMX or AVX512-BF16 only).
    """
    dev = _resolve_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return Runtime(dev, "bf16" if torch.cuda.is_bf16_supported() else "fp16")
        return Runtime(dev, "fp32")
    if precision not in _DTYPES:
        raise ConfigError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("fp16 is not supported on the CPU; use fp32 or bf16")
    return Runtime(dev, precision)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA GPU is available")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return torch.device("cuda", index)
