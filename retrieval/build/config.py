"""What ``index build`` is asked to do, and what it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from retrieval.ann.faiss_index import IndexConfig
from retrieval.ingest.reader import DEFAULT_DECODE_TIMEOUT
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.model.spec import ModelSpec
from retrieval.store.manifest import IndexRecord

__all__ = ["BuildConfig", "BuildReport", "ClusterConfig", "CollectionReport", "StageReport", "verdict"]


@dataclass(frozen=True)
class ClusterConfig:
    """Where ``engine="ray"`` runs and with what (``build.ray_engine``).

    ``address`` None starts a Ray cluster on this machine for the build (its cores and GPUs);
    "auto" or "HOST:PORT" joins a running one. ``encode_workers`` None: one per ``gpus_per_worker``
    GPUs of the cluster, or one CPU worker without GPUs. ``gpus_per_worker`` None: 1 where the
    cluster has GPUs, else 0 (workers on CPUs).
    """

    address: str | None = None
    encode_workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0  # each encoding worker's CPUs (feeding its GPU, or its model)
    # Files per decoding task; None: 16 for CPU workers, 64 where GPUs take batches of 256 (the
    # driver's cost is mostly per task and per batch: 0.36-0.40 ms an image with groups and
    # batches of 16, 0.15 ms with 64, in the README's figures).
    decode_group: int | None = None

    def group_for(self, gpus: float) -> int:
        return self.decode_group or (64 if gpus else 16)


@dataclass(frozen=True)
class BuildConfig:
    """What ``index build`` does: inputs, output folder, model and how to run it."""

    out: Path = Path("indexes/default")
    images: Path | None = None
    captions: tuple[Path, ...] = ()
    model: ModelSpec = field(default_factory=ModelSpec)
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None  # decode processes; default: all cores but one (at least two)
    rebuild: bool = False
    replace_root: bool = False  # index ``images`` in place of the folder the index holds
    image_shard_rows: int = 4096  # inputs per work item, and so rows per shard at most
    caption_shard_rows: int = 65536  # captions are small: files of about 75 MB, few commits
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT  # seconds for one image; 0: no limit
    index: IndexConfig = field(default_factory=IndexConfig)
    engine: Literal["local", "ray"] = "local"  # who encodes: this machine, or a Ray cluster
    # Where JPEGs are decoded: "gpu" (nvJPEG; the rest on the CPU), "cpu", or "auto": the GPU
    # where the model runs on one and torchvision can decode there (local engine).
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # engine "ray": which and how


@dataclass(frozen=True)
class StageReport:
    """One stage of a build: ``inputs`` through it, ``busy`` seconds of work summed over its
    ``workers``, and so the rate it could sustain alone (``capacity``, inputs/s).

    On a CPU build the stages share the machine's cores: there ``busy`` is CPU time (decoding,
    the model) and ``workers`` the cores the stage could use alone.
    """

    name: Literal["decode", "encode", "write", "commit"]
    inputs: int
    busy: float
    workers: int
    restarts: int = 0  # workers that died and were started again (their work redone)

    @property
    def capacity(self) -> float:
        return self.inputs * self.workers / self.busy if self.busy > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"busy": round(self.busy, 3), "capacity": round(self.capacity, 1)}


_BOUND = {"decode": "decode-bound", "encode": "model-bound", "write": "write-bound", "commit": "commit-bound"}


def verdict(
    stages: tuple[StageReport, ...], gpus: bool, shared_cores: int | None = None, seconds: float = 0.0
) -> str:
    """One line on what bounds a build. Stages on their own workers: the one with the lowest
    capacity. Stages sharing ``shared_cores`` cores for ``seconds`` (a CPU build): the one with the
    most of their work, and how busy the cores were."""
    timed = [s for s in stages if s.inputs and s.busy > 0]
    if not timed:
        return ""
    if shared_cores is not None:
        return _shared_verdict(timed, shared_cores, seconds)
    slowest = min(timed, key=lambda s: s.capacity)
    others = ", ".join(f"{s.name} {s.capacity:,.0f}/s" for s in timed if s is not slowest)
    figures = f"{slowest.name} {slowest.capacity:,.0f}/s against {others}" if others else ""
    advice = {
        "decode": "decode-bound: add CPU workers",
        "encode": "GPU-bound" if gpus else "encode-bound: add encoding workers or GPUs",
        "write": "write-bound: the shared storage is the limit",
        "commit": "commit-bound: bigger work items (--shard-rows) make fewer commits",
    }[slowest.name]
    return f"{advice} ({figures})" if figures else advice


def _shared_verdict(timed: list[StageReport], cores: int, seconds: float) -> str:
    work = sum(s.busy for s in timed)
    heaviest = max(timed, key=lambda s: s.busy)
    shares = ", ".join(f"{s.name} {s.busy / work:.0%}" for s in timed)
    busy = work / (seconds * cores) if seconds > 0 else 1.0
    line = (
        f"{_BOUND[heaviest.name]} ({shares} of the work on {cores} shared cores, {min(busy, 1.0):.0%} busy)"
    )
    if busy < 0.75:  # decoding time is CPU time: a slow disk or share shows as idle cores
        line += "; the cores waited: reading the files (a slow disk or network share?) may be the limit"
    return line


@dataclass(frozen=True)
class CollectionReport:
    """One collection after a build. ``indexed + skipped + failed`` is every input seen."""

    indexed: int
    skipped: int
    failed: int
    added: int  # rows written by this build
    encoded: int  # of those, how many went through the model
    reused: int  # of those, how many took the vector of identical content already indexed
    deleted: int  # rows removed from search (inputs gone or changed)
    seconds: float
    refreshed: int = 0  # rows kept with new file stats (touched, same content)
    truncated: int = 0  # of the rows written, captions cut to the tokenizer's limit
    stages: tuple[StageReport, ...] = ()  # how its stages went (none when nothing was to be done)
    verdict: str = ""  # what bound the build, in one line

    def to_dict(self) -> dict[str, Any]:
        plain = {k: v for k, v in vars(self).items() if k != "stages"}
        return plain | {"seconds": round(self.seconds, 3), "stages": [s.to_dict() for s in self.stages]}


@dataclass(frozen=True)
class BuildReport:
    out: Path
    fingerprint: str
    collections: dict[str, CollectionReport]
    seconds: float
    indexes: dict[str, IndexRecord] = field(default_factory=dict)  # the indexes (re)built by this run
    interrupted: bool = False  # stopped early: what it encoded is committed, not yet searchable

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "fingerprint": self.fingerprint,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "collections": {k: v.to_dict() for k, v in self.collections.items()},
        }
