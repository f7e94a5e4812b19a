"""``RayExecutor``: a build's work items on a Ray cluster, with the result of the local engine.

The driver (this process) plans and commits as for a local build; here it only schedules. Images
are decoded in CPU tasks of a group of files each (``ClusterConfig.decode_group``), the model runs
in a pool of actors (``EncodeWorker``: one GPU each, or CPUs), and each work item is assembled and
staged as one data file by a task (``build.staging``); the driver looks up the content already
indexed between decoding and encoding (from the hashes decoding returns) and commits each staged
item as it arrives, in any order. Pixels and vectors stay in the object store. What is in flight
is bounded: decoding tasks two per CPU, at most two batches queued per actor, decoded images
waiting for the model two batches per actor, so memory does not grow with the corpus.

Faults: a decoding task whose worker dies is retried once, then its files are decoded one by one
so that a file that kills its decoder fails alone; an actor that dies is started again once and
its calls in flight are redone. A killed driver leaves staged items that the rerun's plan finds by
name and commits without encoding them again (``docs/decisions/0005-ray-tasks-and-actors.md``).

One module for the driver's side of a run (connecting, scheduling, retries, the stages' report),
which share one run's state; what workers execute is ``ray_tasks``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError

from retrieval.build.config import ClusterConfig, StageReport
from retrieval.build.execute import ItemResult, caption_row
from retrieval.build.image_items import ImageItems
from retrieval.build.items import CaptionInput, WorkItem
from retrieval.build.plan import collection_of, item_sizes
from retrieval.build.ray_tasks import Decoded, Encoded, EncodeWorker, ItemSpec, decode_files, stage_item
from retrieval.build.staging import StagedItem, Staging, item_name
from retrieval.build.stored import StoredVectors
from retrieval.errors import ClusterError, ConfigError
from retrieval.ingest.reader import DEFAULT_DECODE_TIMEOUT, Decoder, default_workers
from retrieval.ingest.sources import ImageFile
from retrieval.model.encoder import Encoder
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.outcomes import Outcome, Reason
from retrieval.progress import Progress
from retrieval.store.schema import ImageRow, Row

__all__ = ["RayExecutor"]

_STARTUP_SECONDS = 600.0  # for the encoding workers to load the model (a cluster may scale up)
_QUEUED_PER_WORKER = 2  # encoding calls in flight per actor: one running, one ready behind it


@dataclass
class _Item:
    """A work item on its way: its rows as they are known, and where their vectors will be."""

    item: WorkItem
    name: str
    ids: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    reused: list[np.ndarray] = field(default_factory=list)  # vectors of ids[: len(reused)]
    later: list[tuple[int, Row]] = field(default_factory=list)  # encoded rows, in part order
    parts: list[tuple[Any, np.ndarray]] = field(default_factory=list)  # (encoding output, picks)
    outcomes: list[Outcome] = field(default_factory=list)
    decoding: int = 0  # groups of this item still decoding
    waiting: int = 0  # its decoded images not yet sent to the model


class RayExecutor:
    """Work items on a Ray cluster (``ClusterConfig``); see the module's docstring.

    Workers stage each collection's items beside the table the build writes (``stored.table``).
    Ray is started (or joined) at the first ``run`` and left by ``close``; the encoding
    workers live from the first ``run`` to ``close``, across the build's collections.
    """

    def __init__(
        self,
        encoder: Encoder,
        root: Path | None,
        cluster: ClusterConfig,
        *,
        workers: int | None = None,
        precision: str = "auto",
        batch_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        decode: Decoder | None = None,
    ) -> None:
        if encoder.spec is None or encoder.fingerprint is None:
            raise ConfigError("the ray engine needs an encoder loaded from files (Encoder.load)")
        self.encoder = encoder
        self.root = root
        self.cluster = cluster
        self.workers = workers  # decoding CPUs of a cluster this build starts (default: as local)
        self.precision = precision
        self.batch_size = batch_size or encoder.image_batch_size
        self.max_pixels = max_pixels
        self.decode_timeout = decode_timeout
        self.decode = decode
        self.stages: tuple[StageReport, ...] = ()  # of the last run
        self.gpus = 0.0  # per encoding worker
        self.shared_cores: int | None = None  # each stage has its workers (the cluster its cores)
        self._started_ray = False
        self._actors: list[Any] = []
        self._queued: list[int] = []
        self._where: list[str] = []
        self._restarts = 0

    # -- the cluster -----------------------------------------------------------------------------

    def connect(self) -> None:
        """Start or join the cluster and start the encoding workers (the first ``run`` does it)."""
        if self._actors:
            return
        config = self.cluster
        if not ray.is_initialized():
            try:
                if config.address is None:
                    ray.init(address="local", **self._local_resources(), **_QUIET)
                else:
                    ray.init(address=config.address, **_QUIET)
            except (ConnectionError, RuntimeError, ValueError, RayError) as e:
                where = f"the Ray cluster at {config.address}" if config.address else "a Ray cluster here"
                raise ClusterError(f"could not start or join {where}: {_cause(e)}") from e
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        per = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        count = config.encode_workers or (max(1, int(gpus // per)) if per else 1)
        if per * count > gpus:
            raise ConfigError(
                f"{count} encoding workers x {per:g} GPUs need {per * count:g} GPUs; the cluster has {gpus:g}"
            )
        if config.cpus_per_worker * count > float(resources.get("CPU", 0)):
            raise ConfigError(
                f"{count} encoding workers x {config.cpus_per_worker:g} CPUs do not fit the cluster's "
                f"{resources.get('CPU', 0):g} CPUs"
            )
        self.gpus = per
        remote = ray.remote(EncodeWorker).options(
            num_cpus=config.cpus_per_worker,
            num_gpus=per,
            max_restarts=1,
            max_task_retries=1,
        )
        # Torch threads: a worker's CPUs while decoding tasks take the others (images); captions
        # have no decoding beside them, so on a cluster this build started here a CPU worker then
        # takes its share of the machine, as the local engine's model does.
        threads = max(1, int(config.cpus_per_worker))
        text_threads = threads
        if per == 0 and self._started_ray and config.address is None:
            text_threads = max(threads, (os.cpu_count() or 1) // count)
        digest = self.encoder.fingerprint.digest if self.encoder.fingerprint else ""
        self._actors = [
            remote.remote(
                self.encoder.spec,
                digest,
                precision=self.precision,
                image_batch_size=self.batch_size,
                threads=threads,
                text_threads=text_threads,
                gpu=per > 0,
            )
            for _ in range(count)
        ]
        try:
            self._where = ray.get([a.ready.remote() for a in self._actors], timeout=_STARTUP_SECONDS)
        except ray.exceptions.GetTimeoutError as e:
            raise ClusterError(
                f"the encoding workers did not start within {_STARTUP_SECONDS:g} s: does the cluster "
                "have the CPUs and GPUs they ask for?"
            ) from e
        except RayError as e:
            raise ClusterError(f"an encoding worker could not start: {_cause(e)}") from e
        self._queued = [0] * count

    def _local_resources(self) -> dict[str, Any]:
        """A cluster on this machine: its GPUs, and as many CPUs for decoding as the local engine
        uses (``--workers``), with the encoding workers' CPUs beside them."""
        import torch

        gpus = torch.cuda.device_count()
        count = self.cluster.encode_workers or max(1, gpus)
        cpus = default_workers(self.workers) + self.cluster.cpus_per_worker * count
        return {"num_cpus": int(np.ceil(cpus)), "num_gpus": gpus}

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ---------------------------------------------------------------------------------

    def run(
        self,
        items: Sequence[WorkItem],
        stored: StoredVectors,
        progress: Progress,
        stop: threading.Event | None = None,
    ) -> Iterator[ItemResult]:
        if not len(items):
            return
        collection = collection_of(items)
        self.connect()
        progress.start(collection, sum(item_sizes(items)))
        run = _Run(self, collection, stored, progress, stop)
        try:
            if collection == "images":
                if self.root is None:
                    raise ValueError("an image work item needs the executor's image root")
                yield from run.images(items if isinstance(items, ImageItems) else ImageItems.of(items))
            else:
                yield from run.captions(items)
        finally:
            run.close()
            self.stages = run.stages()
            progress.finish()

    def _actor(self) -> int | None:
        """The encoding worker with the fewest calls queued, or None while all are full."""
        k = int(np.argmin(self._queued))
        return k if self._queued[k] < _QUEUED_PER_WORKER else None

    def _seen(self, k: int, where: str) -> None:
        if where != self._where[k]:  # the actor was started again (its calls redone)
            self._restarts += 1
            self._where[k] = where


# Worker logs stay in the session's log folder (/tmp/ray/session_latest/logs), off the progress bar.
_QUIET: dict[str, Any] = {
    "include_dashboard": False,
    "log_to_driver": False,
    "logging_level": logging.ERROR,
}


class _Run:
    """One collection's items through the cluster: what is in flight, and what each ref means."""

    def __init__(
        self,
        executor: RayExecutor,
        collection: str,
        stored: StoredVectors,
        progress: Progress,
        stop: threading.Event | None,
    ) -> None:
        self.x = executor
        self.collection = collection
        self.stored = stored
        self.progress = progress
        self.stop = stop
        self.staging = Staging(stored.store.folder, stored.table.prefix)
        fingerprint = executor.encoder.fingerprint
        self.fingerprint = fingerprint.to_dict() if fingerprint is not None else {}
        self.digest = fingerprint.digest if fingerprint is not None else ""
        self.pending: dict[Any, tuple[Callable[[Any], None], Callable[[RayError], None]]] = {}
        self.done: deque[ItemResult] = deque()
        self.items: dict[int, _Item] = {}  # by position: items with work in flight
        self.held = 0  # decoded images waiting for the model or in it
        self.clock = {"decode": [0, 0.0], "encode": [0, 0.0], "write": [0, 0.0]}
        self.restarts = executor._restarts
        actors = len(executor._actors) * executor.cluster.cpus_per_worker
        self.decode_slots = max(1, int(ray.cluster_resources().get("CPU", 1) - actors))
        self.decode_remote = ray.remote(decode_files).options(num_cpus=1, max_retries=1, num_returns=2)
        # A CPU each: Arrow and zstd work, and a task without one would start a worker process
        # (importing torch) for every item staged at once.
        self.stage_remote = ray.remote(stage_item).options(num_cpus=1, max_retries=1)

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    # -- images ----------------------------------------------------------------------------------

    def images(self, items: ImageItems) -> Iterator[ItemResult]:
        batch = self.x.batch_size
        decoding_cap = 2 * self.decode_slots
        step = self.x.cluster.group_for(self.x.gpus)
        held_cap = 2 * batch * len(self.x._actors) + decoding_cap * step
        waiting: deque[tuple[int, Any, list[int]]] = deque()  # (position, pixels, picks) for the model
        decoding = 0
        files = items.files()

        def groups() -> Iterator[tuple[int, list[tuple[int, ImageFile]]]]:
            """Each item's groups of files; an item staged by an earlier build is taken as it is."""
            for position in range(len(items)):
                if (entry := self._open(position, items[position])) is None:
                    continue
                a, b = int(items.cuts[position]), int(items.cuts[position + 1])
                starts = range(a, b, step)
                entry.decoding = len(starts)
                for start in starts:
                    yield position, [(k, files[k]) for k in range(start, min(b, start + step))]

        def submit(position: int, group: list[tuple[int, ImageFile]]) -> None:
            nonlocal decoding
            decoding += 1
            refs: Any = self.decode_remote.remote(  # two refs (num_returns=2)
                str(self.x.root),
                group,
                self.x.encoder.preprocess,
                self.x.max_pixels,
                self.x.decode_timeout,
                self.x.decode,
            )
            meta, pixels = refs

            def decoded(d: Decoded) -> None:
                nonlocal decoding
                decoding -= 1
                self.clock["decode"][0] += len(group)
                self.clock["decode"][1] += d.seconds
                entry = self.items[position]
                entry.decoding -= 1
                entry.outcomes += [outcome for _, outcome in d.failures]
                picks = []
                for k, image in enumerate(d.images):
                    x = items.input(image.index)
                    flags = ("reduced_on_load",) if image.reduced else ()
                    row = ImageRow(x.path, image.sha256, x.size, x.mtime_ns, image.width, image.height, flags)
                    id_ = entry.item.ids[items.place(image.index)[1]]
                    if (vector := self.stored.get(image.sha256)) is not None:
                        entry.ids.append(id_)
                        entry.rows.append(row)
                        entry.reused.append(vector)
                    else:
                        entry.later.append((id_, row))
                        picks.append(k)
                self.progress.advance(len(d.failures) + len(d.images) - len(picks))
                if picks:
                    entry.waiting += len(picks)
                    self.held += len(picks)
                    waiting.append((position, pixels, picks))
                self._ready(position)

            def crashed(e: RayError) -> None:
                nonlocal decoding
                decoding -= 1
                entry = self.items[position]
                if len(group) > 1:  # a file that kills its decoder: found by decoding one by one
                    entry.decoding += len(group) - 1
                    for one in group:
                        submit(position, [one])
                    return
                entry.decoding -= 1
                (_, file), why = group[0], f"its decoding worker died ({_cause(e)})"
                entry.outcomes.append(
                    Outcome(file.path, "failed", "decode", why, Reason.UNDECODABLE, file.size, file.mtime_ns)
                )
                self.progress.advance(1)
                self._ready(position)

            self.pending[meta] = (decoded, crashed)

        def encode(everything: bool) -> None:
            """Decoded images to the model, a batch at a time (``everything``: the last one too)."""
            while waiting and (everything or sum(len(p) for _, _, p in waiting) >= batch):
                k = self.x._actor()
                if k is None:
                    return
                taken: list[tuple[int, Any, list[int]]] = []
                while waiting and sum(len(p) for _, _, p in taken) < batch:
                    taken.append(waiting.popleft())
                picks = [np.asarray(p, np.int64) for _, _, p in taken]
                call = self.x._actors[k].images.options(num_returns=2)
                vectors, stats = call.remote(picks, *(pixels for _, pixels, _ in taken))
                self._sent(k, stats)
                offset = 0
                for position, _, p in taken:
                    entry = self.items[position]
                    entry.parts.append((vectors, np.arange(offset, offset + len(p))))
                    entry.waiting -= len(p)
                    offset += len(p)
                    self._ready(position)

        stream = groups()
        exhausted = False
        while not self.stopping:
            while not exhausted and decoding < decoding_cap and self.held < held_cap:
                if (nxt := next(stream, None)) is None:
                    exhausted = True
                else:
                    submit(*nxt)
            encode(everything=exhausted and decoding == 0)
            yield from self._drain()
            if exhausted and not self.pending and not waiting:
                break
            self._wait()
        yield from self._settle()

    # -- captions --------------------------------------------------------------------------------

    def captions(self, items: Sequence[WorkItem]) -> Iterator[ItemResult]:
        step = self.x.encoder.text_batch_size * 4
        batcher = self.x.encoder.text_batcher
        for position, item in enumerate(items):
            if self.stopping:
                break
            if (entry := self._open(position, item)) is None:
                yield from self._drain()
                continue
            inputs = [x for x in item.inputs if isinstance(x, CaptionInput)]
            # A chunk at a time, so that the model starts on the first while the rest is read.
            for start in range(0, len(inputs), step):
                chunk = range(start, min(start + step, len(inputs)))
                hashes = {k: inputs[k].sha256 for k in chunk}
                found = {k: self.stored.get(hashes[k]) for k in chunk}
                known = [(k, v) for k, v in found.items() if v is not None]
                if known:
                    _, flags = batcher.tokenize_flagged([inputs[k].record.text for k, _ in known])
                    for (k, vector), cut in zip(known, flags, strict=True):
                        entry.ids.append(item.ids[k])
                        entry.rows.append(caption_row(inputs[k], hashes[k], bool(cut)))
                        entry.reused.append(vector)
                    self.progress.advance(len(known))
                part = [k for k, v in found.items() if v is None]
                if not part:
                    continue
                while (worker := self.x._actor()) is None:
                    yield from self._drain()
                    self._wait()
                call = self.x._actors[worker].texts.options(num_returns=2)
                out, stats = call.remote([inputs[k].record.text for k in part])
                self._sent(worker, stats)
                entry.later += [(item.ids[k], caption_row(inputs[k], hashes[k], False)) for k in part]
                entry.parts.append((out, np.arange(len(part))))
            self._ready(position)
            yield from self._drain()
        yield from self._settle()

    # -- items -----------------------------------------------------------------------------------

    def _open(self, position: int, item: WorkItem) -> _Item | None:
        """Start on ``item``; None when an earlier build staged it already (then it is done)."""
        name = item_name(item, self.digest)
        staged = self.staging.find(name)
        if staged is not None:
            self.progress.advance(len(item.ids))
            self.done.append(ItemResult.of_staged(item, staged))
            return None
        entry = self.items[position] = _Item(item, name)
        return entry

    def _sent(self, k: int, stats: Any) -> None:
        """An encoding call went to worker ``k``: count it in flight until ``stats`` comes."""
        self.x._queued[k] += 1

        def encoded(e: Encoded) -> None:
            self.x._queued[k] -= 1
            self.x._seen(k, e.worker)
            self.clock["encode"][0] += e.inputs
            self.clock["encode"][1] += e.seconds
            if self.collection == "images":
                self.held -= e.inputs
            self.progress.advance(e.inputs)

        def lost(e: RayError) -> None:
            raise ClusterError(f"encoding worker {k} failed twice, and its batch with it: {_cause(e)}") from e

        self.pending[stats] = (encoded, lost)

    def _ready(self, position: int) -> None:
        """Stage the item once all its inputs are decoded and on their way through the model."""
        entry = self.items.get(position)
        if entry is None or entry.decoding or entry.waiting:
            return
        del self.items[position]
        spec = ItemSpec(
            str(self.staging.folder),
            self.staging.prefix,
            entry.name,
            self.collection,
            self.fingerprint,
            entry.ids + [i for i, _ in entry.later],
            entry.rows + [r for _, r in entry.later],
            [picks for _, picks in entry.parts],
            tuple(entry.outcomes),
        )
        dim = int(self.fingerprint["dim"])
        reused = np.stack(entry.reused) if entry.reused else np.empty((0, dim), np.float32)
        ref = self.stage_remote.remote(spec, reused, *(out for out, _ in entry.parts))

        def staged(s: StagedItem) -> None:
            self.clock["write"][0] += len(entry.item.ids)
            self.clock["write"][1] += s.seconds
            self.done.append(ItemResult.of_staged(entry.item, s))

        def lost(e: RayError) -> None:
            raise ClusterError(f"work item {entry.name} could not be staged: {_cause(e)}") from e

        self.pending[ref] = (staged, lost)

    def _drain(self) -> Iterator[ItemResult]:
        while self.done:
            yield self.done.popleft()

    def _wait(self, timeout: float = 1.0) -> None:
        """Act on whatever finished (at least one ref, or ``timeout`` seconds)."""
        if not self.pending:
            return
        refs = list(self.pending)
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            act, failed = self.pending.pop(ref)
            try:
                value = ray.get(ref)
            except RayError as e:
                failed(e)
                continue
            act(value)

    def _settle(self) -> Iterator[ItemResult]:
        """Wait for what is in flight (after a stop: nothing new starts; items whose inputs were
        not all decoded by then stay planned)."""
        while self.pending:
            self._wait()
            yield from self._drain()
        yield from self._drain()

    def close(self) -> None:
        """Forget what is in flight (the build ended early): the workers' own queues drain."""
        self.pending.clear()
        self.x._queued = [0] * len(self.x._actors)

    def stages(self) -> tuple[StageReport, ...]:
        (dn, ds), (en, es), (wn, ws) = (self.clock[s] for s in ("decode", "encode", "write"))
        reports = [
            StageReport("encode", int(en), float(es), len(self.x._actors), self.x._restarts - self.restarts),
            StageReport("write", int(wn), float(ws), self.decode_slots),
        ]
        if self.collection == "images":
            reports.insert(0, StageReport("decode", int(dn), float(ds), self.decode_slots))
        return tuple(reports)


def _cause(e: BaseException) -> str:
    """The first line of what went wrong on a worker."""
    text = str(getattr(e, "cause", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__
