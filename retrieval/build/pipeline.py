"""``build_index``: an image folder and caption files -> a committed index folder.

Plan -> execute -> commit, one collection after the other: the planner (``build.plan``) compares
the inputs with what the folder holds and gives every new input its id, an executor
(``build.execute``, local worker processes by default) encodes the work items, and the committer
(``build.commit``) writes each result as it arrives, then rebuilds the FAISS indexes whose rows
changed. A build stopped (``stop``) or killed at any moment keeps what it committed, and a rerun
redoes only the items that were in flight, with the ids they were planned with.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from retrieval.build.commit import Committer, Target
from retrieval.build.config import BuildConfig, BuildReport, CollectionReport, StageReport, verdict
from retrieval.build.execute import Executor, LocalExecutor
from retrieval.build.plan import CollectionPlan, plan_captions, plan_images, read_view
from retrieval.build.stored import StoredVectors
from retrieval.durable import file_sha256
from retrieval.errors import BuildInterrupted, ConfigError, InputError, InputWarning
from retrieval.ingest.gpu_decode import GpuJpegDecoder, gpu_decoding_problem
from retrieval.ingest.sources import CAPTION_FORMATS, IMAGE_EXTENSIONS, ImageFile, SidecarFile, walk_images
from retrieval.model.encoder import Encoder
from retrieval.outcomes import Outcome
from retrieval.progress import Progress, Silent
from retrieval.store.folder import Store
from retrieval.store.location import model_record

__all__ = ["BuildConfig", "BuildReport", "CollectionReport", "Progress", "build_index"]


def build_index(
    config: BuildConfig,
    progress: Progress | None = None,
    encoder: Encoder | None = None,
    stop: threading.Event | None = None,
    executor: Executor | None = None,
) -> BuildReport:
    """Encode ``config.images`` and ``config.captions`` into the index folder ``config.out``.

    ``encoder`` may be passed in (already loaded); otherwise ``config.model`` is loaded.
    ``executor`` runs the work items (default: ``LocalExecutor`` on this machine). ``stop``, once
    set (the command line sets it on Ctrl-C or SIGTERM), ends the build at the next safe point:
    what is encoded by then is committed, FAISS indexes are not rebuilt, and ``BuildInterrupted``
    is raised with the report. Rerunning the build finishes the work.
    """
    _check_config(config)
    progress = progress or Silent()
    started = time.perf_counter()
    with Store.open(config.out, write=True) as store:
        if config.images is not None and not (config.rebuild or config.replace_root):
            _check_root(store, config.out, config.images)
        own_encoder = encoder is None
        if encoder is None:
            encoder = Encoder.load(
                config.model,
                device=config.device,
                precision=config.precision,
                image_batch_size=config.batch_size,
            )
        try:
            if encoder.fingerprint is None:
                raise ConfigError("the encoder has no model fingerprint: load it with Encoder.load")
            stat = encoder.source.stat if encoder.source else None
            record = model_record(
                encoder.spec or config.model, store.folder, encoder.fingerprint.to_dict(), stat
            )
            own_executor = executor is None
            executor = executor or _executor(config, encoder)  # a cluster is joined before any write
            try:
                target = Target(store, record, rebuild=config.rebuild)
                run = _Run(target, executor, progress, stop, encoder.dim)
                collections = run.collections(config)
            finally:
                if own_executor:
                    executor.close()
            stopped = stop is not None and stop.is_set()
            indexes = {} if stopped else run.committer.build_indexes(config.index, progress)
            if not stopped:
                target.promote()
            target.settle_model()
        finally:
            if own_encoder:
                encoder.close()
    seconds = time.perf_counter() - started
    report = BuildReport(
        config.out, encoder.fingerprint.digest, collections, seconds, indexes, interrupted=stopped
    )
    if report.interrupted:
        raise BuildInterrupted(report)
    return report


def _executor(config: BuildConfig, encoder: Encoder) -> Executor:
    if config.engine == "local":
        return LocalExecutor(
            encoder,
            config.images,
            workers=config.workers,
            max_pixels=config.max_pixels,
            decode_timeout=config.decode_timeout,
            gpu_decoder=_gpu_decoder(config, encoder),
        )
    try:
        from retrieval.build.ray_engine import RayExecutor
    except ImportError as e:
        raise ConfigError(
            f"the ray engine needs Ray ({e}): pip install 'retrieval[ray]' (make install installs it)"
        ) from e
    executor = RayExecutor(
        encoder,
        config.images,
        config.cluster,
        workers=config.workers,
        precision=config.precision,
        batch_size=config.batch_size,
        max_pixels=config.max_pixels,
        decode_timeout=config.decode_timeout,
    )
    try:
        executor.connect()
    except BaseException:
        executor.close()
        raise
    return executor


def _gpu_decoder(config: BuildConfig, encoder: Encoder) -> GpuJpegDecoder | None:
    """JPEGs on the GPU where asked for (an error where that cannot be) or where ``auto`` finds it can."""
    if config.decode == "cpu" or config.images is None:
        return None
    problem = gpu_decoding_problem(encoder.preprocess, encoder.runtime.device)
    if problem is None:
        return GpuJpegDecoder(encoder.preprocess, encoder.runtime.device)
    if config.decode == "gpu":
        raise ConfigError(f"cannot decode on the GPU: {problem}; use --decode cpu (or auto)")
    return None


class _Run:
    """One build's collections: plan each against the target, execute, commit."""

    def __init__(
        self, target: Target, executor: Executor, progress: Progress, stop: threading.Event | None, dim: int
    ) -> None:
        self.target = target
        self.executor = executor
        self.progress = progress
        self.stop = stop
        self.dim = dim
        self.committer = Committer(target)

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def collections(self, config: BuildConfig) -> dict[str, CollectionReport]:
        reports: dict[str, CollectionReport] = {}
        sidecars = []
        if config.images is not None and not self.stopping:
            started = time.perf_counter()
            root = config.images
            images_found = 0

            def walked() -> Iterator[ImageFile | SidecarFile | Outcome]:
                nonlocal images_found
                for w in walk_images(root):  # a stream: the planner keeps columns, not objects
                    images_found += isinstance(w, ImageFile)
                    yield w

            def same_content(path: str, sha256: str) -> bool:
                return _same_content(root / path, sha256)

            view = read_view(self.target.view(), "images")
            plan = plan_images(
                walked(), root, view, item_size=config.image_shard_rows, same_content=same_content
            )
            if not images_found:
                kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
                warnings.warn(
                    f"no images in {root} (or its sub-folders) to index: looked for {kinds}",
                    InputWarning,
                    stacklevel=3,
                )
            sidecars = plan.sidecars
            reports["images"] = self.execute(plan, started)
        if self.stopping:
            return reports
        if config.captions or sidecars or "captions" in self.target.collections:
            started = time.perf_counter()
            images = config.images
            sources: list[tuple[str, Path, str | None]] = (
                [(s.path, images / s.path, s.image) for s in sidecars] if images is not None else []
            )
            files = {str(p.resolve()): p for p in config.captions}  # a file given twice counts once
            sources += [(name, path, None) for name, path in files.items()]
            view = read_view(self.target.view(), "captions")
            plan = plan_captions(
                sources,
                view,
                item_size=config.caption_shard_rows,
                keep_sidecars=images is None,
                keep_files=not files,
            )
            reports["captions"] = self.execute(plan, started)
        return reports

    def execute(self, plan: CollectionPlan, started: float) -> CollectionReport:
        """Commit ``plan``, run its items, commit each result; the collection's report."""
        self.committer.begin(plan)
        added = encoded = reused = truncated = 0
        if len(plan.items):
            stored = StoredVectors(
                self.target.view(), plan.collection, self.dim, self.target.table(plan.collection)
            )
            for result in self.executor.run(plan.items, stored, self.progress, self.stop):
                self.committer.add(result)
                added += result.added
                encoded += result.encoded
                reused += result.reused
                truncated += result.truncated
        self.committer.end(plan.collection)
        counts = self.target.state(plan.collection).counts
        stages = self._stages() if len(plan.items) else ()
        seconds = time.perf_counter() - started
        return CollectionReport(
            indexed=counts.get("indexed", 0),
            skipped=counts.get("skipped", 0),
            failed=counts.get("failed", 0),
            added=added,
            encoded=encoded,
            reused=reused,
            deleted=len(plan.deleted),
            seconds=seconds,
            refreshed=len(plan.restat),
            truncated=truncated,
            stages=stages,
            verdict=verdict(stages, self.executor.gpus > 0, self.executor.shared_cores, seconds),
        )

    def _stages(self) -> tuple[StageReport, ...]:
        """The executor's stages, then writing (where its workers did not) and committing."""
        stages, c = self.executor.stages, self.committer
        if any(s.name == "write" for s in stages):  # written by the workers: here only moved
            return (*stages, StageReport("commit", c.written, c.write_seconds + c.commit_seconds, 1))
        return (
            *stages,
            StageReport("write", c.written, c.write_seconds, 1),
            StageReport("commit", c.written, c.commit_seconds, 1),
        )


def _check_config(config: BuildConfig) -> None:
    for path, what in ((config.images, "image folder"), (config.out, "index folder")):
        if path is not None and _URI.match(str(path)):
            raise InputError(
                f"{path}: the {what} must be a path (on a file system every worker sees, for "
                "--engine ray); object-store URIs are not supported"
            )
    if config.images is None and not config.captions:
        raise ConfigError("nothing to index: give an image folder, --captions files, or both")
    if config.decode not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"decode {config.decode!r}: use auto, cpu or gpu")
    if config.decode == "gpu":  # before the index folder is touched; the rest once the model is placed
        if config.engine != "local":
            raise ConfigError("--decode gpu is for the local engine (the ray engine decodes on CPUs)")
        if config.device == "cpu" or not torch.cuda.is_available():
            where = "the model is set to run on the CPU" if config.device == "cpu" else "no CUDA GPU here"
            raise ConfigError(f"cannot decode on the GPU: {where}; use --decode cpu (or auto)")
    for path in config.captions:
        if not path.is_file():
            raise InputError(f"caption file {path} does not exist")
        if path.suffix.lower() not in CAPTION_FORMATS:
            raise InputError(f"{path}: unsupported caption format (use {', '.join(sorted(CAPTION_FORMATS))})")
    if config.images is not None and not config.images.is_dir():
        raise InputError(f"image folder {config.images} does not exist or is not a folder")
    for value, what in (
        (config.image_shard_rows, "image shard rows"),
        (config.caption_shard_rows, "caption shard rows"),
    ):
        if value < 1:
            raise ConfigError(f"{what} must be at least 1")


_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/")  # s3://, gs://, hdfs:// (a Path keeps one slash)


def _check_root(store: Store, out: Path, images: Path) -> None:
    """Refuse to point an index at another image folder unless asked: a typo must not drop rows."""
    state = store.state("images")
    if state.root is None or state.counts.get("indexed", 0) == 0:
        return
    if state.root != str(images.resolve()):
        raise InputError(
            f"{out} holds the images of {state.root}, not {images}: give that folder, or pass "
            f"--replace-root to index {images} in its place (identical files keep their vectors)"
        )


def _same_content(path: Path, sha256: str) -> bool:
    """Whether ``path`` still hashes to ``sha256`` (unreadable counts as changed)."""
    try:
        return file_sha256(path) == sha256
    except OSError:
        return False
