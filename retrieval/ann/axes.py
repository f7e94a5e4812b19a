"""The principal axes of a collection's vectors, for the compressed IVF kinds (IVF-SQ, IVF-PQ).

A dual encoder's embeddings rarely fill their dimension evenly: a few directions carry most of
the energy, and a projection from a narrower tower leaves whole directions empty. Codes spent on
those directions buy nothing. The compressed kinds therefore first rotate each vector onto the
eigenvectors of the vectors' second moment (not their covariance: inner products are kept, so no
mean is subtracted), keep the leading axes that hold all but ``_LEFT_OUT`` of the energy, and code
only those. The exact re-rank that follows scores the original vectors, so what the rotation leaves
out can reorder candidates, never the results.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["PrincipalAxes", "principal_axes"]

_LEFT_OUT = 1e-5  # the share of the energy the kept axes may leave out
_ALIGN = 8  # kept axes rounded up to a multiple of this: FAISS's SIMD scanners work 8 lanes at a time
_MOMENT_BLOCK = 65_536  # sample rows summed into the second moment at a time


class PrincipalAxes:
    """The kept axes, (kept, dim) float32 with orthonormal rows, and the energy they hold."""

    def __init__(self, axes: np.ndarray, held: float) -> None:
        self.axes = np.ascontiguousarray(axes, dtype=np.float32)
        self.held = held

    @property
    def kept(self) -> int:
        return int(self.axes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.axes.shape[1])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(vectors @ self.axes.T, dtype=np.float32)

    def transform(self) -> faiss.LinearTransform:
        """The rotation as FAISS's own transform, so that a saved index applies it by itself."""
        rotation = faiss.LinearTransform(self.dim, self.kept, False)
        faiss.copy_array_to_vector(self.axes.ravel(), rotation.A)
        rotation.is_trained = True
        return rotation

    def describe(self) -> str:
        return (
            f"on the {self.kept} principal axes of {self.dim} that hold {100 * self.held:.3f}% of the energy"
        )


def principal_axes(sample: np.ndarray, left_out: float = _LEFT_OUT) -> PrincipalAxes:
    """The leading eigenvectors of ``sample``'s second moment that hold all but ``left_out`` of its
    energy (at least one axis; every axis when the sample is empty or has no energy)."""
    sample = np.asarray(sample, dtype=np.float32)
    dim = sample.shape[1]
    if len(sample) == 0:
        return PrincipalAxes(np.eye(dim, dtype=np.float32), 1.0)
    # Summed in float64 a block at a time: a float64 copy of the whole sample would double it.
    moment = np.zeros((dim, dim), np.float64)
    for start in range(0, len(sample), _MOMENT_BLOCK):
        block = sample[start : start + _MOMENT_BLOCK].astype(np.float64)
        moment += block.T @ block
    moment /= len(sample)
    values, vectors = np.linalg.eigh(moment)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    total = float(values.sum())
    if total <= 0:
        return PrincipalAxes(np.eye(dim, dtype=np.float32), 1.0)
    share = np.cumsum(values) / total
    kept = int(np.searchsorted(share, 1 - left_out) + 1)
    kept = min(dim, -(-kept // _ALIGN) * _ALIGN)
    return PrincipalAxes(vectors[:, :kept].T, float(share[kept - 1]))
