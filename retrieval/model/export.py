"""Writing ad-hoc vectors (``retrieval embed``) to .npy or .parquet."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.durable import atomic_write
from retrieval.errors import ConfigError
from retrieval.vectors import embedding_array

__all__ = ["write_vectors"]


def write_vectors(out: Path, inputs: Sequence[str], vectors: np.ndarray, key: str, fingerprint: str) -> None:
    """``.npy``: the (n, D) float32 matrix; ``.parquet``: ``key`` and ``embedding`` columns."""
    suffix = out.suffix.lower()
    if suffix == ".npy":
        atomic_write(out, lambda tmp: tmp.write_bytes(_npy_bytes(vectors)))
    elif suffix == ".parquet":
        table = pa.table({key: pa.array(list(inputs), pa.string()), "embedding": embedding_array(vectors)})
        table = table.replace_schema_metadata(
            {b"retrieval.fingerprint": json.dumps({"digest": fingerprint}).encode()}
        )
        atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    else:
        raise ConfigError(f"--out must end in .npy or .parquet, got {out.name}")


def _npy_bytes(vectors: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()
