"""``build_index``: an image folder and caption files -> a committed store of embedding shards.

The runner joins three stages: the reader (``reader.read_images``, worker processes), the model
(``Encoder``) and the writer (``Store``). Work is planned against what the store already holds:

- a file whose size and mtime match its row is left alone; a new or changed one is encoded; a
  removed or changed one has its old row deleted from search;
- content already indexed (a moved or duplicate file, a repeated caption) reuses its vector;
- the plan is cut into shards of consecutive items; ids are ``next_id + position in the plan``
  and shards are committed in plan order, one manifest commit each, so a build killed at any
  moment redoes at most the shard in flight and ends with the same ids as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from retrieval.ann.faiss_index import IndexConfig, IndexRecord, build_collection_index, live_vectors
from retrieval.durable import file_sha256
from retrieval.errors import BuildInterrupted, ConfigError, InputError, InputWarning
from retrieval.ingest.reader import DEFAULT_DECODE_TIMEOUT, DecodedGroup, default_workers, read_images
from retrieval.ingest.sources import (
    CAPTION_FORMATS,
    IMAGE_EXTENSIONS,
    CaptionRecord,
    ImageFile,
    SidecarFile,
    read_caption_file,
    read_sidecar,
    walk_images,
)
from retrieval.model.encoder import Encoder
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.model.spec import ModelSpec
from retrieval.outcomes import Outcome, Reason
from retrieval.progress import Progress, Silent
from retrieval.store.folder import (
    SCHEMA_VERSION,
    CollectionState,
    FileRef,
    Manifest,
    Store,
    index_source,
    shard_stem,
)
from retrieval.store.location import model_record
from retrieval.vectors import check_vectors, embedding_array, embedding_matrix

__all__ = ["BuildConfig", "BuildReport", "CollectionReport", "Progress", "build_index"]


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
    image_shard_rows: int = 4096
    caption_shard_rows: int = 16384
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT  # seconds for one image; 0: no limit
    index: IndexConfig = field(default_factory=IndexConfig)


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
            "collections": {
                k: vars(v) | {"seconds": round(v.seconds, 3)} for k, v in self.collections.items()
            },
        }


@dataclass
class _Row:
    """A row waiting for its shard: everything but the id, which its plan position decides."""

    fields: dict[str, Any]
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class _PlannedCaption:
    """A caption to write: the record as read, its metadata as stored, its file's stats."""

    record: CaptionRecord
    metadata: str  # JSON, keys sorted
    size: int
    mtime_ns: int


@dataclass
class _Shard:
    start: int  # first plan position
    size: int
    rows: dict[int, _Row] = field(default_factory=dict)
    outcomes: dict[int, Outcome] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.outcomes) + sum(r.vector is not None for r in self.rows.values()) == self.size

    def finished_prefix(self) -> _Shard | None:
        """The shard cut to its first items that are all done (encoded or failed); None if none are."""
        end = self.start
        while end < self.start + self.size and (
            end in self.outcomes or (end in self.rows and self.rows[end].vector is not None)
        ):
            end += 1
        if end == self.start:
            return None
        rows = {p: r for p, r in self.rows.items() if p < end}
        return _Shard(self.start, end - self.start, rows, {p: o for p, o in self.outcomes.items() if p < end})


def build_index(
    config: BuildConfig,
    progress: Progress | None = None,
    encoder: Encoder | None = None,
    stop: threading.Event | None = None,
) -> BuildReport:
    """Encode ``config.images`` and ``config.captions`` into the store at ``config.out``.

    ``encoder`` may be passed in (already loaded); otherwise ``config.model`` is loaded.
    ``stop``, once set (the command line sets it on Ctrl-C or SIGTERM), ends the build at the
    next safe point: what is encoded by then is committed, FAISS indexes are not rebuilt, and
    ``BuildInterrupted`` is raised with the report. Rerunning the build finishes the work.
    """
    if config.images is None and not config.captions:
        raise ConfigError("nothing to index: give an image folder, --captions files, or both")
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
            builder = _Builder(store, encoder, config, progress or Silent(), stop)
            collections = builder.run()
            indexes = {} if builder.stopping else builder.build_indexes()
            if store.manifest is not None and store.manifest.model != builder.manifest.model:
                store.commit(replace(store.manifest, model=builder.manifest.model))  # the model moved
            store.collect_garbage()
        finally:
            if own_encoder:
                encoder.close()
        report = BuildReport(
            config.out,
            builder.fingerprint.digest,
            collections,
            time.perf_counter() - started,
            indexes,
            interrupted=builder.stopping,
        )
    if report.interrupted:
        raise BuildInterrupted(report)
    return report


class _Builder:
    def __init__(
        self,
        store: Store,
        encoder: Encoder,
        config: BuildConfig,
        progress: Progress,
        stop: threading.Event | None = None,
    ) -> None:
        if encoder.fingerprint is None:
            raise ConfigError("the encoder has no model fingerprint: load it with Encoder.load")
        self.store = store
        self.encoder = encoder
        self.config = config
        self.progress = progress
        self.fingerprint = encoder.fingerprint
        if not config.rebuild:
            store.check_model(self.fingerprint.digest)
        self.manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            generation=store.manifest.generation if store.manifest else 0,
            model=model_record(encoder.spec or config.model, store.folder, self.fingerprint.to_dict()),
            collections=dict(store.manifest.collections) if store.manifest else {},
        )
        if config.rebuild and store.manifest is not None:
            # Start over from an empty commit; the old files go with the next clean-up.
            self.manifest = store.commit(
                replace(self.manifest, generation=self.manifest.generation + 1, collections={})
            )
        self.dim = encoder.dim
        self.stop = stop

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    # -- shared machinery ------------------------------------------------------------------------

    def run(self) -> dict[str, CollectionReport]:
        reports: dict[str, CollectionReport] = {}
        sidecars: list[SidecarFile] = []
        if self.stopping:
            return reports
        if self.config.images is not None:
            reports["images"], sidecars = self._images(self.config.images)
        if self.stopping:
            return reports
        if self.config.captions or sidecars or "captions" in self.manifest.collections:
            reports["captions"] = self._captions(sidecars)
        return reports

    def build_indexes(self) -> dict[str, IndexRecord]:
        """(Re)build the FAISS index of every collection whose rows changed since its last one."""
        built: dict[str, IndexRecord] = {}
        for collection in ("images", "captions"):
            state = self._state(collection)
            if collection not in self.manifest.collections:
                continue
            if state.counts.get("indexed", 0) == 0:
                if state.index:  # every row deleted: nothing left to search
                    self._commit(collection, replace(state, index=None))
                continue
            source = index_source(state)
            wanted = self.config.index.kind
            if (
                state.index
                and state.index.get("source") == source
                and wanted in ("auto", state.index["kind"], state.index.get("requested"))
            ):
                continue
            other = "captions" if collection == "images" else "images"
            queries = None
            if self._state(other).counts.get("indexed", 0):
                blocks = [v for _, v in live_vectors(self.store, other)]
                queries = np.concatenate(blocks) if blocks else None
            self.progress.start(f"{collection} index", 1)
            record = build_collection_index(self.store, collection, self.config.index, queries, other)
            self.progress.advance(1)
            self.progress.finish()
            if record is None:
                continue
            # The rows it covers (shards are only appended), so that readers see exactly those.
            snapshot = {
                "shards": len(state.shards),
                "deleted": asdict(state.deleted) if state.deleted else None,
            }
            self._commit(collection, replace(state, index={**record.to_dict(), "source": source, **snapshot}))
            built[collection] = record
        return built

    def _state(self, collection: str) -> CollectionState:
        return self.manifest.collections.get(collection, CollectionState())

    def _commit(self, collection: str, state: CollectionState) -> None:
        collections = {**self.manifest.collections, collection: state}
        self.manifest = self.store.commit(
            replace(self.manifest, generation=self.manifest.generation + 1, collections=collections)
        )

    def _live_rows(
        self, collection: str, columns: Sequence[str]
    ) -> tuple[pa.Table, list[tuple[FileRef, int]]]:
        """Live rows (deleted ones dropped) of ``columns``, and where each row lives."""
        if collection not in self.manifest.collections:
            return pa.table({c: [] for c in columns}), []
        deleted = self.store.deleted_ids(collection)
        tables: list[pa.Table] = []
        places: list[tuple[FileRef, int]] = []
        for ref, table in self.store.iter_shards(collection, ["id", *(c for c in columns if c != "id")]):
            keep = ~np.isin(table.column("id").to_numpy(), deleted)
            tables.append(table.filter(pa.array(keep)).select(list(columns)))
            places.extend((ref, int(i)) for i in np.flatnonzero(keep))
        return (pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})), places

    def _reusable(self, collection: str) -> dict[str, tuple[FileRef, int]]:
        """Where a vector of each content hash is stored, deleted rows included.

        A deleted row's vector stays in its shard until the folder is rebuilt, so content that
        comes back (a root switched back, a file restored) is not encoded again.
        """
        if collection not in self.manifest.collections:
            return {}
        deleted = self.store.deleted_ids(collection)
        live: dict[str, tuple[FileRef, int]] = {}
        gone: dict[str, tuple[FileRef, int]] = {}
        for ref, table in self.store.iter_shards(collection, ["id", "sha256"]):
            dead = np.isin(table.column("id").to_numpy(), deleted)
            for row, (sha, is_dead) in enumerate(zip(table.column("sha256").to_pylist(), dead, strict=True)):
                (gone if is_dead else live)[sha] = (ref, row)
        return gone | live  # a live copy is preferred: its shard is the one being read anyway

    def _vector_at(self, place: tuple[FileRef, int], cache: dict[str, np.ndarray]) -> np.ndarray:
        ref, row = place
        if ref.file not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[ref.file] = embedding_matrix(
                self.store.read_table(ref, ["embedding"]).column("embedding"), self.dim
            )
        return cache[ref.file][row]

    def _delete(
        self,
        collection: str,
        ids: Iterable[int],
        outcomes: list[Outcome],
        sources: dict[str, list[int]] | None = None,
    ) -> None:
        """Commit deletions, the outcomes known so far and finished sources before any new shard."""
        state = self._state(collection)
        if sources is not None:
            state = replace(state, sources=sources)
        new = np.fromiter(ids, dtype=np.int64)
        generation = self.manifest.generation + 1
        deleted = state.deleted
        if len(new):
            all_ids = np.union1d(self.store.deleted_ids(collection), new)
            deleted = self.store.write_table(
                f"{collection}/deleted-g{generation:06d}.parquet", pa.table({"id": all_ids})
            )
        out = self.store.write_outcomes(f"{collection}/outcomes-g{generation:06d}.jsonl", outcomes)
        self._commit(
            collection,
            replace(state, deleted=deleted, outcomes=out, counts=_counts(state, outcomes, 0, len(new))),
        )

    def _write_shard(
        self,
        collection: str,
        shard: _Shard,
        base_id: int,
        outcomes: list[Outcome],
        make_table: Callable[[list[int], list[_Row], np.ndarray], pa.Table],
        finished: dict[str, list[int]] | None = None,
    ) -> None:
        """Write one shard and commit it; ``finished`` sources are done once it is committed."""
        state = self._state(collection)
        if finished:
            state = replace(state, sources={**state.sources, **finished})
        positions = sorted(shard.rows)
        ids = [base_id + p for p in positions]
        rows = [shard.rows[p] for p in positions]
        generation = self.manifest.generation + 1
        shards = state.shards
        if rows:
            vectors = np.stack([r.vector for r in rows if r.vector is not None]).astype(
                np.float32, copy=False
            )
            check_vectors(vectors, self.dim)
            table = make_table(ids, rows, vectors)
            metadata = {
                b"retrieval.schema_version": str(SCHEMA_VERSION).encode(),
                b"retrieval.collection": collection.encode(),
                b"retrieval.model.fingerprint": json.dumps(self.fingerprint.to_dict()).encode(),
            }
            table = table.replace_schema_metadata(metadata)
            shards = (
                *shards,
                self.store.write_table(f"{collection}/shard-{base_id + shard.start:012d}.parquet", table),
            )
        new_outcomes = [shard.outcomes[p] for p in sorted(shard.outcomes)]
        outcomes.extend(new_outcomes)
        out = state.outcomes
        if new_outcomes or out is None:
            out = self.store.write_outcomes(f"{collection}/outcomes-g{generation:06d}.jsonl", outcomes)
        counts = _counts(state, outcomes, len(rows), 0)
        self._commit(
            collection,
            replace(
                state, shards=shards, next_id=base_id + shard.start + shard.size, outcomes=out, counts=counts
            ),
        )

    # -- images ------------------------------------------------------------------------------------

    def _images(self, root: Path) -> tuple[CollectionReport, list[SidecarFile]]:
        started = time.perf_counter()
        walked = list(walk_images(root))
        files = [w for w in walked if isinstance(w, ImageFile)]
        sidecars = [w for w in walked if isinstance(w, SidecarFile)]
        outcomes = [w for w in walked if isinstance(w, Outcome)]
        if not files:
            kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
            warnings.warn(
                f"no images in {root} (or its sub-folders) to index: looked for {kinds}",
                InputWarning,
                stacklevel=2,
            )

        state = self._state("images")
        root_text = str(root.resolve())
        live, _ = self._live_rows("images", ["id", "path", "sha256", "size", "mtime_ns"])
        stored_outcomes = self.store.outcomes("images")
        previous = {o.source: o for o in stored_outcomes if o.stage != "walk"}
        # build_index refused another root unless --replace-root: then the old root's rows all go.
        replacing = state.root not in (None, root_text)
        current: dict[str, tuple[int, str, int, int]] = {}
        if not replacing:
            columns = (live.column(c).to_pylist() for c in ("path", "id", "sha256", "size", "mtime_ns"))
            current = {p: (i, h, s, m) for p, i, h, s, m in zip(*columns, strict=True)}
        reuse = self._reusable("images")

        plan: list[ImageFile] = []
        stale: list[int] = [int(i) for i in live.column("id").to_pylist()] if replacing else []
        restat: dict[int, tuple[int, int]] = {}  # id -> new (size, mtime_ns): touched, same content
        seen = set()
        for f in files:
            seen.add(f.path)
            row = current.get(f.path)
            if row is not None and (row[2], row[3]) == (f.size, f.mtime_ns):
                continue
            if row is not None and row[2] == f.size and _same_content(root / f.path, row[1]):
                restat[row[0]] = (f.size, f.mtime_ns)  # touched or copied over: keep the row and id
                continue
            if row is not None:
                stale.append(row[0])
            before = previous.get(f.path)
            unchanged = before is not None and (before.size, before.mtime_ns) == (f.size, f.mtime_ns)
            if unchanged and before is not None and not before.code.retried:
                outcomes.append(before)  # its content failed and has not changed: not retried
                continue
            plan.append(f)
        # A folder that could not be listed this time keeps its rows: absent is not removed.
        unlisted = tuple(
            "" if o.source == "." else o.source + "/" for o in outcomes if o.code is Reason.CANNOT_LIST
        )
        kept_away = unlisted or ("\0",)
        stale.extend(i for p, (i, *_) in current.items() if p not in seen and not p.startswith(kept_away))

        if restat:
            self._restat("images", restat)
        if (
            stale
            or state.root != root_text
            or state.outcomes is None
            or set(outcomes) != set(stored_outcomes)
        ):
            self.manifest = replace(
                self.manifest,
                collections={
                    **self.manifest.collections,
                    "images": replace(self._state("images"), root=root_text),
                },
            )
            self._delete("images", stale, outcomes)

        encoded, reused = self._encode_images(root, plan, reuse, outcomes)
        report = _report(
            self._state("images"),
            encoded + reused,
            encoded,
            reused,
            len(stale),
            time.perf_counter() - started,
            refreshed=len(restat),
        )
        return report, sidecars

    def _restat(self, collection: str, updates: dict[int, tuple[int, int]]) -> None:
        """Record new (size, mtime_ns) for rows whose file was touched but not changed.

        Each shard holding such a row is rewritten with the same ids and vectors (copy on write)
        and swapped in by one commit; the old file goes with the next clean-up.
        """
        state = self._state(collection)
        generation = self.manifest.generation + 1
        wanted = np.fromiter(updates, dtype=np.int64)
        shards = list(state.shards)
        for position, ref in enumerate(shards):
            table = self.store.read_table(ref)
            ids = table.column("id").to_numpy()
            hit = np.isin(ids, wanted)
            if not hit.any():
                continue
            size = table.column("size").to_numpy().copy()
            mtime = table.column("mtime_ns").to_numpy().copy()
            for k in np.flatnonzero(hit):
                size[k], mtime[k] = updates[int(ids[k])]
            table = table.set_column(table.schema.get_field_index("size"), "size", pa.array(size, pa.int64()))
            table = table.set_column(
                table.schema.get_field_index("mtime_ns"), "mtime_ns", pa.array(mtime, pa.int64())
            )
            stem = shard_stem(ref.file)
            shards[position] = self.store.write_table(f"{stem}-r{generation:06d}.parquet", table)
        self._commit(collection, replace(state, shards=tuple(shards)))

    def _encode_images(
        self,
        root: Path,
        plan: list[ImageFile],
        reuse: dict[str, tuple[FileRef, int]],
        outcomes: list[Outcome],
    ) -> tuple[int, int]:
        if not plan:
            return 0, 0
        size = self.config.image_shard_rows
        base_id = self._state("images").next_id
        shards = {
            k: _Shard(k * size, min(size, len(plan) - k * size))
            for k in range((len(plan) + size - 1) // size)
        }
        next_shard = 0
        batch_rows: list[_Row] = []
        batch_pixels: list[torch.Tensor] = []
        cache: dict[str, np.ndarray] = {}
        encoded = reused = 0
        workers = default_workers(self.config.workers)
        batch_size = self.encoder.image_batch_size
        self.progress.start("images", len(plan))

        def flush() -> None:
            nonlocal encoded
            if batch_rows:
                vectors = self.encoder.encode_pixels(torch.cat(batch_pixels).numpy())
                for row, vector in zip(batch_rows, vectors, strict=True):
                    row.vector = vector
                encoded += len(batch_rows)
                self.progress.advance(len(batch_rows))
                batch_rows.clear()
                batch_pixels.clear()

        def commit_ready() -> None:
            nonlocal next_shard
            while next_shard in shards and shards[next_shard].complete:
                self._write_shard("images", shards.pop(next_shard), base_id, outcomes, _image_table)
                next_shard += 1

        # On a GPU the main process only feeds the device: its CPU threads would spin against the
        # decoding workers for the same cores.
        threads = torch.get_num_threads()
        if self.encoder.runtime.device.type == "cuda":
            torch.set_num_threads(min(threads, 2))
        try:
            groups = read_images(
                root,
                plan,
                self.encoder.preprocess,
                workers=workers,
                max_pixels=self.config.max_pixels,
                decode_timeout=self.config.decode_timeout,
            )
            for group in _until_stopped(groups, self.stop):
                for index, outcome in group.failures:
                    shards[index // size].outcomes[index] = outcome
                    self.progress.advance(1)
                for k, image in enumerate(group.images):
                    file = plan[image.index]
                    row = _Row(
                        {
                            "path": file.path,
                            "sha256": image.sha256,
                            "size": file.size,
                            "mtime_ns": file.mtime_ns,
                            "width": image.width,
                            "height": image.height,
                            "flags": ["reduced_on_load"] if image.reduced else [],
                        }
                    )
                    shards[image.index // size].rows[image.index] = row
                    if image.sha256 in reuse:
                        row.vector = self._vector_at(reuse[image.sha256], cache)
                        reused += 1
                        self.progress.advance(1)
                    else:
                        batch_rows.append(row)
                        batch_pixels.append(group.pixels[k : k + 1])
                if len(batch_rows) >= batch_size:
                    flush()
                commit_ready()
            if self.stopping:
                # Keep what is done: the finished start of the shard in flight is committed as a
                # shorter shard, so the rerun plans the rest at the very same ids.
                done = next_shard in shards and shards[next_shard].finished_prefix()
                if done:
                    self._write_shard("images", done, base_id, outcomes, _image_table)
            else:
                flush()
                commit_ready()
        finally:
            torch.set_num_threads(threads)
        self.progress.finish()
        return encoded, reused

    # -- captions ----------------------------------------------------------------------------------

    def _captions(self, sidecars: list[SidecarFile]) -> CollectionReport:
        started = time.perf_counter()
        state = self._state("captions")
        live, _ = self._live_rows("captions", ["id", "source", "row", "text", "image", "metadata"])
        old_outcomes = self.store.outcomes("captions")
        # What each source's rows hold now: row number -> (id, what the row says).
        rows_of: dict[str, dict[int, tuple[int, tuple[Any, ...]]]] = {}
        columns = ("id", "source", "row", "text", "image", "metadata")
        for i, source, row, text, image, metadata in zip(
            *(live.column(c).to_pylist() for c in columns), strict=True
        ):
            rows_of.setdefault(source, {})[row] = (i, (text, image, metadata))
        reuse = self._reusable("captions")

        images_root = Path(self.config.images) if self.config.images is not None else None
        sources: list[tuple[str, Path, str | None]] = (
            [(s.path, images_root / s.path, s.image) for s in sidecars] if images_root else []
        )
        files = {str(p.resolve()): p for p in self.config.captions}  # the same file given twice counts once
        sources += [(name, path, None) for name, path in files.items()]
        outcomes: list[Outcome] = []
        plan: list[_PlannedCaption] = []
        stale: list[int] = []
        present = set()
        # A source is done when every row of the version seen is committed; until then a rerun
        # keeps the rows that are already there and plans the rest.
        done = {k: v for k, v in state.sources.items() if k in {s for s, _, _ in sources}}
        pending: dict[str, tuple[int, list[int]]] = {}  # caption file -> (last plan position, stats)
        for source, path, image in sources:
            present.add(source)
            existing = rows_of.get(source, {})
            try:
                info = path.stat()
            except OSError as e:
                outcomes.append(
                    Outcome(
                        source,
                        "failed",
                        "read",
                        f"cannot read: {e.strerror or e}",
                        Reason.UNREADABLE,
                        parent=source,
                    )
                )
                stale.extend(i for i, _ in existing.values())
                done.pop(source, None)
                continue
            stats = [info.st_size, info.st_mtime_ns]
            if done.get(source) == stats:
                outcomes.extend(o for o in old_outcomes if (o.parent or o.source) == source)
                continue
            done.pop(source, None)
            records = (
                read_sidecar(path, source, image) if image is not None else read_caption_file(path, source)
            )
            kept: set[int] = set()
            for record in records:
                if isinstance(record, Outcome):
                    outcomes.append(replace(record, size=stats[0], mtime_ns=stats[1], parent=source))
                    continue
                metadata = json.dumps(record.metadata, sort_keys=True, ensure_ascii=False, default=str)
                old = existing.get(record.row)
                if old is not None and old[1] == (record.text, record.image, metadata):
                    kept.add(record.row)  # the same row as indexed: it keeps its id
                    continue
                plan.append(_PlannedCaption(record, metadata, stats[0], stats[1]))
            stale.extend(i for row, (i, _) in existing.items() if row not in kept)
            if plan and plan[-1].record.source == source:
                pending[source] = (len(plan) - 1, stats)
            else:
                done[source] = stats
        # A run without an image folder leaves sidecar captions alone; one without --captions
        # leaves caption files alone: their rows, outcomes and completion carry forward.
        known = {*rows_of, *state.sources, *(o.parent or o.source for o in old_outcomes)}
        carried = {
            source
            for source in known
            if source not in present
            and (
                (images_root is None and not Path(source).is_absolute())
                or (not files and Path(source).is_absolute())
            )
        }
        present |= carried
        outcomes.extend(o for o in old_outcomes if (o.parent or o.source) in carried)
        done.update({k: v for k, v in state.sources.items() if k in carried})
        stale.extend(i for source, rows in rows_of.items() if source not in present for i, _ in rows.values())

        if stale or state.outcomes is None or set(outcomes) != set(old_outcomes) or done != state.sources:
            self._delete("captions", stale, outcomes, done)
        encoded, reused, truncated = self._encode_captions(plan, reuse, outcomes, pending)
        return _report(
            self._state("captions"),
            encoded + reused,
            encoded,
            reused,
            len(stale),
            time.perf_counter() - started,
            truncated=truncated,
        )

    def _encode_captions(
        self,
        plan: list[_PlannedCaption],
        reuse: dict[str, tuple[FileRef, int]],
        outcomes: list[Outcome],
        pending: dict[str, tuple[int, list[int]]],
    ) -> tuple[int, int, int]:
        if not plan:
            return 0, 0, 0
        size = self.config.caption_shard_rows
        base_id = self._state("captions").next_id
        cache: dict[str, np.ndarray] = {}
        encoded = reused = truncated_rows = 0
        # The bar moves every few model batches, not once a shard (16,384 captions by default).
        step = self.encoder.text_batch_size * 4
        self.progress.start("captions", len(plan))
        for start in range(0, len(plan), size):
            chunk = plan[start : start + size]
            shard = _Shard(start, len(chunk))
            texts = [p.record.text for p in chunk]
            hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
            todo = [k for k, h in enumerate(hashes) if h not in reuse]
            ids, truncated = self.encoder.text_batcher.tokenize_flagged(texts)  # flags for reused rows too
            self.progress.advance(len(chunk) - len(todo))
            fresh: dict[int, np.ndarray] = {}
            for offset in range(0, len(todo), step):
                if self.stopping:
                    break
                part = todo[offset : offset + step]
                vectors = self.encoder.encode_text_ids([ids[k] for k in part])
                fresh.update(zip(part, vectors, strict=True))
                self.progress.advance(len(part))
            if self.stopping:
                # The rows up to the first one not yet encoded are committed; the rerun does the rest.
                waiting = set(todo) - set(fresh)
                chunk = chunk[: min(waiting)] if waiting else chunk
                shard = _Shard(start, len(chunk))
            for k, planned in enumerate(chunk):
                record = planned.record
                vector = fresh[k] if k in fresh else self._vector_at(reuse[hashes[k]], cache)
                cut = bool(truncated[k])
                shard.rows[start + k] = _Row(
                    {
                        "text": record.text,
                        "source": record.source,
                        "row": record.row,
                        "image": record.image,
                        "sha256": hashes[k],
                        "size": planned.size,
                        "mtime_ns": planned.mtime_ns,
                        "flags": ["truncated"] if cut else [],
                        "metadata": planned.metadata,
                    },
                    vector,
                )
            encoded += len(fresh)
            reused += len(chunk) - len(fresh)
            truncated_rows += int(np.count_nonzero(truncated[: len(chunk)]))
            end = start + len(chunk)
            finished = {source: stats for source, (last, stats) in pending.items() if start <= last < end}
            if chunk:
                self._write_shard("captions", shard, base_id, outcomes, _caption_table, finished)
            if self.stopping:
                break
        self.progress.finish()
        return encoded, reused, truncated_rows


def _image_table(ids: list[int], rows: list[_Row], vectors: np.ndarray) -> pa.Table:
    column = _columns(rows)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "path": pa.array(column["path"], pa.string()),
            "sha256": pa.array(column["sha256"], pa.string()),
            "size": pa.array(column["size"], pa.int64()),
            "mtime_ns": pa.array(column["mtime_ns"], pa.int64()),
            "width": pa.array(column["width"], pa.int32()),
            "height": pa.array(column["height"], pa.int32()),
            "flags": pa.array(column["flags"], pa.list_(pa.string())),
            "embedding": embedding_array(vectors),
        }
    )


def _caption_table(ids: list[int], rows: list[_Row], vectors: np.ndarray) -> pa.Table:
    column = _columns(rows)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "text": pa.array(column["text"], pa.string()),
            "source": pa.array(column["source"], pa.string()),
            "row": pa.array(column["row"], pa.int64()),
            "image": pa.array(column["image"], pa.string()),
            "sha256": pa.array(column["sha256"], pa.string()),
            "size": pa.array(column["size"], pa.int64()),
            "mtime_ns": pa.array(column["mtime_ns"], pa.int64()),
            "flags": pa.array(column["flags"], pa.list_(pa.string())),
            "metadata": pa.array(column["metadata"], pa.string()),
            "embedding": embedding_array(vectors),
        }
    )


def _columns(rows: list[_Row]) -> dict[str, list[Any]]:
    return {key: [r.fields[key] for r in rows] for key in rows[0].fields}


def _counts(state: CollectionState, outcomes: list[Outcome], added: int, deleted: int) -> dict[str, int]:
    indexed = state.counts.get("indexed", 0) + added - deleted
    return {
        "indexed": indexed,
        "skipped": sum(o.status == "skipped" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
    }


def _report(
    state: CollectionState,
    added: int,
    encoded: int,
    reused: int,
    deleted: int,
    seconds: float,
    *,
    refreshed: int = 0,
    truncated: int = 0,
) -> CollectionReport:
    counts = state.counts
    return CollectionReport(
        indexed=counts.get("indexed", 0),
        skipped=counts.get("skipped", 0),
        failed=counts.get("failed", 0),
        added=added,
        encoded=encoded,
        reused=reused,
        deleted=deleted,
        seconds=seconds,
        refreshed=refreshed,
        truncated=truncated,
    )


def _until_stopped(groups: Iterator[DecodedGroup], stop: threading.Event | None) -> Iterator[DecodedGroup]:
    """``groups`` until ``stop`` is set. A worker that a terminal's Ctrl-C reached before it could
    ignore it ends the decoding with an error: once stopping, that is simply the end."""
    try:
        for group in groups:
            yield group
            if stop is not None and stop.is_set():
                return
    except Exception:
        if stop is None or not stop.is_set():
            raise


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
