"""Embedding vectors at the boundaries: the one unit-norm check, and Arrow <-> numpy without copies.

Every vector the engine stores is float32, finite and of unit norm (the encoder normalizes once);
the writer refuses anything else with ``check_vectors``, and ``index verify`` uses the same check.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from retrieval.errors import StoreError

__all__ = ["NORM_TOLERANCE", "check_vectors", "embedding_array", "embedding_matrix", "unit_norm"]

NORM_TOLERANCE = 1e-3  # |norm - 1| allowed: bf16 autocast rounds, the norm is still taken in float32


def unit_norm(vectors: np.ndarray) -> np.ndarray:
    """(n,) bool: the rows that are finite and of unit norm."""
    norms = np.linalg.norm(vectors, axis=1)
    return np.isfinite(norms) & (np.abs(norms - 1) <= NORM_TOLERANCE)


def check_vectors(vectors: np.ndarray, dim: int) -> None:
    """Refuse anything but finite unit-norm float32 rows of the store's dimension."""
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] != dim:
        raise StoreError(f"vectors must be float32 (n, {dim}), got {vectors.dtype} {vectors.shape}")
    if not unit_norm(vectors).all():
        raise StoreError("vectors must be finite and unit-norm")


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, D) float32 -> Arrow fixed_size_list<float32>[D] without copying row by row."""
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Arrow fixed_size_list<float32>[D] -> (n, D) float32."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
