"""How big an index will be, and what fits: ``plan_index``, a pure function of the row count, the
dimension and the memory budget, picks the kind (``auto`` keeps exact search up to 50,000 vectors,
then IVF-Flat while it fits the budget, then IVF-SQ (8-bit codes), else IVF-PQ (4-bit codes); the
two compressed kinds code the vectors' principal axes and re-rank on an exact copy of the vectors
kept in a file on disk, not in memory), IVF's list count (about 4 sqrt(n), at most 4,096) and
training sample (100 vectors a list, never fewer than FAISS's 39: fewer lists when the budget
cannot hold that many), and the reason ``index info`` shows. The default budget is half the memory
available when the build starts (``resolve_budget``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from retrieval.errors import ConfigError

__all__ = [
    "BLOCK",
    "KINDS",
    "Budget",
    "IndexPlan",
    "available_memory",
    "plan_index",
    "pq_m",
    "resolve_budget",
    "size_text",
]

KINDS = ("flat", "ivf", "hnsw", "ivfsq", "ivfpq", "auto")
_TRAIN_PER_CENTROID = 39  # FAISS's minimum training points per centroid (it warns below)
_TRAIN_PER_LIST = 100  # IVF training points aimed for a list: k-means is stable from about there
# IVF-SQ codes each kept axis in 8 bits (256 levels): close enough to the vectors that the exact
# re-rank needs only a few candidates past k. IVF-PQ, for budgets that cannot hold those, codes each
# axis in 4 bits (a sub-quantizer of 16 centroids), laid out for FAISS's fast scan (SIMD table
# lookups); its coarser codes need many more candidates re-ranked.
_SQ_BITS = 8
_PQ_BITS = 4
_LIST_GROWTH = 1.4  # lists grown block by block hold about 40% spare capacity
_AUTO_EXACT_MAX = 50_000  # below this, exact search is fast enough that approximation buys nothing
_BUDGET_SHARE = 0.5  # the default budget: this share of the memory available when a build starts
# k-means and the assignment of every vector cost n x lists: with lists growing as sqrt(n) a build
# would cost n^1.5. Past this many lists (4 sqrt(n) reaches it at about 1M vectors) the lists grow
# longer instead, and the search scans more of them (nprobe is tuned to the target recall).
_MAX_LISTS = 4096
HNSW_LINKS = 32
BLOCK = 65_536  # vectors read, added or searched at a time
_MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Budget:
    """Bytes a build may hold (None: no limit known), and where that figure came from."""

    bytes: int | None
    source: str

    def fits(self, need: int) -> bool:
        return self.bytes is None or need <= self.bytes

    def __str__(self) -> str:
        if self.bytes is None:
            return f"no memory limit ({self.source})"
        return f"the memory budget of {size_text(self.bytes)} ({self.source})"


def available_memory(meminfo: Path | None = None) -> tuple[int, str] | None:
    """Bytes the machine can give a process without swapping, and where that was read; None when
    neither the kernel's estimate (MemAvailable in ``meminfo``, /proc/meminfo by default) nor the
    count of free pages can be read."""
    meminfo = meminfo or _MEMINFO
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, f"MemAvailable in {meminfo}"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        # Free pages only (no MemAvailable: not Linux, or an old kernel): page cache not counted.
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages (sysconf)"
    return None


def resolve_budget(memory_budget: int | None) -> Budget:
    """The budget a build works within: ``memory_budget`` bytes if given, else half the memory
    available now (the other half for the process around it and for the page cache)."""
    if memory_budget is not None:
        return Budget(memory_budget, "given by --memory-budget")
    available = available_memory()
    if available is None:
        return Budget(None, "the available memory could not be read")
    amount, source = available
    return Budget(int(amount * _BUDGET_SHARE), f"half of the {size_text(amount)} {source}")


@dataclass(frozen=True)
class IndexPlan:
    """What to build for one collection, what it will hold, and why."""

    kind: str  # flat, ivf, hnsw, ivfsq or ivfpq
    rows: int
    dim: int
    nlist: int = 0  # IVF lists
    train: int = 0  # IVF training vectors
    pq_bits: int = 0  # IVF-SQ, IVF-PQ: bits a code of an axis
    peak_bytes: int = 0  # the build's peak: index or training sample, plus blocks being read
    reason: str | None = None  # shown by `index info`


def plan_index(kind: str, n: int, dim: int, budget: Budget, train_sample: int | None = None) -> IndexPlan:
    """The index to build for ``n`` vectors of ``dim`` within ``budget``, sized and explained.

    Raises ConfigError for an unknown kind, or when ``auto`` finds nothing that fits the budget.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown index type {kind!r}; use flat, ivf, hnsw, ivfsq, ivfpq or auto")
    if kind == "auto" and n <= _AUTO_EXACT_MAX:
        return _sized(IndexPlan("flat", n, dim, reason=f"auto: {n:,} vectors, exact search is fast enough"))
    if kind in ("flat", "hnsw"):
        plan = _sized(IndexPlan(kind, n, dim))
        over = f"needs about {size_text(plan.peak_bytes)}, over {budget}: built as asked"
        return plan if budget.fits(plan.peak_bytes) else replace(plan, reason=over)
    nlist, train = _lists(n, dim, budget, train_sample)
    ivf = _sized(IndexPlan("ivf", n, dim, nlist, train))
    lists = f"{nlist:,} lists trained on {train:,} vectors ({train // nlist} a list)"
    head = (
        f"{'auto: ' if kind == 'auto' else ''}{n:,} vectors x {dim} take {size_text(4 * n * dim)} "
        f"uncompressed; IVF-Flat needs about {size_text(ivf.peak_bytes)}, "
        f"{'within' if budget.fits(ivf.peak_bytes) else 'over'} {budget}"
    )
    if kind == "ivf" or (kind == "auto" and budget.fits(ivf.peak_bytes)):
        asked = "" if budget.fits(ivf.peak_bytes) else " (built as asked)"
        return replace(ivf, reason=f"{head}: IVF-Flat{asked}, {lists}")
    rerank = f"re-ranked on the exact vectors read from a file of {size_text(n * (8 + 4 * dim))}"
    sq = _sized(IndexPlan("ivfsq", n, dim, nlist, train, _SQ_BITS))
    if kind == "ivfsq" or (kind == "auto" and budget.fits(sq.peak_bytes)):
        asked = "" if budget.fits(sq.peak_bytes) else " (over the budget: built as asked)"
        what = (
            f"IVF-SQ with 8-bit codes of the principal axes (at most {_code_bytes(dim, _SQ_BITS)} bytes "
            f"a vector, about {size_text(sq.peak_bytes)} in all){asked}, {rerank}"
        )
        return replace(sq, reason=f"{head}: {what}, {lists}")
    if n < _TRAIN_PER_CENTROID * 2**_PQ_BITS:
        needed = _TRAIN_PER_CENTROID * 2**_PQ_BITS
        why = f"ivfpq needs at least {needed:,} vectors to train its quantizers, {n:,} here"
        return _sized(IndexPlan("flat", n, dim, reason=why))
    plan = _sized(IndexPlan("ivfpq", n, dim, nlist, train, _PQ_BITS))
    if not budget.fits(plan.peak_bytes) and kind == "auto":
        raise ConfigError(
            f"{n:,} vectors x {dim} need about {size_text(plan.peak_bytes)} even as IVF-PQ, "
            f"over {budget}; give a larger --memory-budget"
        )
    asked = "" if budget.fits(plan.peak_bytes) else " (over the budget: built as asked)"
    what = (
        f"IVF-PQ with 4-bit fast-scan codes of the principal axes (at most {_code_bytes(dim, _PQ_BITS)} "
        f"bytes a vector, about {size_text(plan.peak_bytes)} in all){asked}, {rerank}"
    )
    if kind == "auto":
        head += f"; IVF-SQ about {size_text(sq.peak_bytes)}, over it too"
    return replace(plan, reason=f"{head}: {what}, {lists}")


def _list_count(n: int) -> int:
    # About 4 sqrt(n) lists: a list scan costs about a probe's; at most _MAX_LISTS.
    return int(min(_MAX_LISTS, max(1, 4 * np.sqrt(n))))


def _lists(n: int, dim: int, budget: Budget, train_sample: int | None) -> tuple[int, int]:
    """IVF's list count and training sample size: 100 vectors a list (or ``train_sample``), at most
    the collection and what the budget holds beside a block; fewer lists when that leaves any list
    with fewer than 39."""
    nlist = _list_count(n)
    train = min(n, _TRAIN_PER_LIST * nlist if train_sample is None else train_sample)
    if budget.bytes is not None:
        train = min(train, max(0, budget.bytes - _blocks_bytes(n, dim)) // _train_bytes(1, dim))
    train = max(train, min(n, _TRAIN_PER_CENTROID))  # k-means needs points; FAISS warns below 39
    return max(1, min(nlist, train // _TRAIN_PER_CENTROID)), train


def pq_m(dim: int) -> int:
    """IVF-PQ's sub-quantizers: one for every kept axis (4 bits each, so a byte for 2 axes)."""
    return dim


def _code_bytes(dim: int, bits: int) -> int:
    """The most bytes a code takes: every axis kept (the principal axes are usually fewer)."""
    return (dim * bits + 7) // 8


def _blocks_bytes(n: int, dim: int) -> int:
    """A block of vectors with its ids, and the data file's table it is read from."""
    return 2 * min(n, BLOCK) * (4 * dim + 8)


def _train_bytes(train: int, dim: int) -> int:
    return train * (4 * dim + 12)  # the sample, and k-means' assignment and distance for each point


def _sized(plan: IndexPlan) -> IndexPlan:
    """``plan`` with its peak: the larger of training and the built index, plus the blocks read.

    Per vector: flat, its float32 copy and its id; HNSW, also its links (2 x 32 on the bottom level,
    a few above); IVF-Flat, its list entry (lists allocated at their final size) and its list number
    from the first pass; IVF-PQ, its code and id in lists grown block by block (its re-rank copy is
    written to a file as it is built, not held). IVF also holds its centroids, IVF-PQ its
    sub-quantizers, and the compressed kinds their principal axes. IVF-SQ is sized as IVF-Flat with a
    byte a kept axis (at most the dimension).
    """
    n, dim = plan.rows, plan.dim
    if plan.kind == "flat":
        per = 4 * dim + 8.0
    elif plan.kind == "hnsw":
        per = 4 * dim + 8 + 2 * HNSW_LINKS * 4 * 1.2
    elif plan.kind == "ivf":
        per = 4 * dim + 8 + 4.0
    elif plan.kind == "ivfsq":
        per = _code_bytes(dim, plan.pq_bits) + 8 + 4.0
    else:
        per = (_code_bytes(dim, plan.pq_bits) + 8) * _LIST_GROWTH
    fixed = plan.nlist * dim * 4
    if plan.kind in ("ivfsq", "ivfpq"):
        fixed += dim * dim * 4  # the principal axes
    if plan.kind == "ivfpq":
        fixed += dim * 2**plan.pq_bits * 4  # the sub-quantizers' centroids
    peak = max(int(n * per) + fixed, _train_bytes(plan.train, dim)) + _blocks_bytes(n, dim)
    return replace(plan, peak_bytes=peak)


def size_text(amount: float) -> str:
    if amount >= 1e9:
        return f"{amount / 1e9:.1f} GB"
    return f"{amount / 1e6:.0f} MB" if amount >= 1e7 else f"{amount / 1e6:.1f} MB"
