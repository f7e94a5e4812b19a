"""What ``retrieval serve`` is told: the indexes, where to listen, and the limits it enforces."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.errors import ConfigError
from retrieval.ingest.reader import DEFAULT_DECODE_TIMEOUT
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.store.location import ModelPaths

__all__ = ["API_KEY_VARIABLE", "ServeConfig", "is_loopback"]

API_KEY_VARIABLE = "RETRIEVAL_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """The service's settings; ``check()`` refuses an unsafe or unusable combination."""

    indexes: tuple[Path, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False  # listen off loopback without a key (the user said so)
    cors_origins: tuple[str, ...] = ()
    image_root: Path | None = None  # where the images are on this host, if not where they were indexed
    model: ModelPaths = field(default_factory=ModelPaths)
    device: str = "auto"
    # Coalescing (see service.batching): once the model is free, a batch starts when full, after
    # quiet_ms without a new query, or after max_wait_ms, whichever comes first.
    max_batch: int = 64
    max_wait_ms: float = 10.0
    quiet_ms: float = 2.0
    max_k: int = 1000
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT
    poll_seconds: float = 2.0  # how often each index folder is checked for a new version
    threads: int | None = None  # torch and FAISS threads for the process (default: the cores)

    def check(self) -> ServeConfig:
        if not self.indexes:
            raise ConfigError("give at least one --index folder")
        for folder in self.indexes:
            if not Path(folder).is_dir():
                raise ConfigError(f"--index {folder}: no such folder (build one with `index build`)")
        if not is_loopback(self.host) and not self.api_key and not self.insecure:
            raise ConfigError(
                f"--host {self.host} listens beyond this machine: set --api-key (or {API_KEY_VARIABLE}), "
                "or pass --insecure to serve without one"
            )
        for name, value in [("max-batch", self.max_batch), ("max-k", self.max_k), ("port", self.port)]:
            if value < 1 and not (name == "port" and value == 0):
                raise ConfigError(f"--{name} must be at least 1, got {value}")
        if self.max_wait_ms < 0 or self.quiet_ms < 0 or self.poll_seconds <= 0 or self.max_upload_bytes < 1:
            raise ConfigError(
                "--max-wait-ms and --quiet-ms must be >= 0, the poll interval and upload limit > 0"
            )
        if "*" in self.cors_origins:
            raise ConfigError("--cors-origin takes the origins to allow, not '*'")
        if self.image_root is not None and not self.image_root.is_dir():
            raise ConfigError(f"--image-root {self.image_root} is not a folder")
        return self

    @property
    def cores(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
