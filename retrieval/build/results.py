"""What an executor yields for a work item: ``ItemResult``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.build.plan import WorkItem
from retrieval.build.staging import StagedItem
from retrieval.outcomes import Outcome
from retrieval.store.schema import Row

__all__ = ["ItemResult"]


@dataclass
class ItemResult:
    """What became of a work item's inputs: the rows written and the inputs that failed."""

    item: WorkItem
    ids: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    complete: bool = False  # every input of the item is settled (False: a stop came first)
    encoded: int = 0
    reused: int = 0
    truncated: int = 0
    staged: StagedItem | None = None  # written by a worker elsewhere: rows in its file, not here

    @classmethod
    def of_staged(cls, item: WorkItem, staged: StagedItem) -> ItemResult:
        """A whole item a worker staged (``build.staging``)."""
        return cls(
            item,
            outcomes=list(staged.outcomes),
            complete=True,
            encoded=staged.encoded,
            reused=staged.reused,
            truncated=staged.truncated,
            staged=staged,
        )

    @property
    def settled(self) -> int:
        return len(self.ids) + len(self.outcomes)

    @property
    def added(self) -> int:
        """Rows this result adds to its collection."""
        return self.staged.rows if self.staged is not None else len(self.rows)

    def matrix(self, dim: int) -> np.ndarray:
        return (
            np.stack(self.vectors).astype(np.float32, copy=False)
            if self.vectors
            else np.empty((0, dim), np.float32)
        )
