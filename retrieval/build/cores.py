"""Sharing a CPU's cores between the decoding workers and the model.

On a CPU build, decoding and the model run on the same cores. torch's threads wait for each other
at every operation, so a model with a thread on each core loses much of its time whenever a
decoding worker takes one of those cores (measured on the README's 2-core machine: a tiny tower
with two threads beside two decoding workers indexed 600 JPEGs at 205 to 259 images/s, with one
thread at 291). So the model gets
the threads its share of the work needs, ``round(cores * m / (d + m))``: ``d`` is the decoding CPU
time per image (the workers measure their own), ``m`` the model's, measured on its first batch at
one thread (all of the model's work then runs in the calling thread, so that thread's CPU time is
the model's). A model that dominates gets every core (its workers mostly wait on a full queue); one
about as fast as decoding gets one thread and the workers take the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CoreShare"]


@dataclass
class CoreShare:
    """The model's thread count on ``cores`` shared with decoding workers, from what they cost."""

    cores: int
    model_cpu: float | None = None  # seconds of one thread per image (None: not measured yet)
    decoding: bool = True  # False once every file is decoded: the model then has the cores alone

    def add_encoded(self, images: int, threads: int, thread_cpu: float) -> None:
        """A batch the model encoded with ``threads`` threads, ``thread_cpu`` seconds of the calling
        thread's CPU time. Only a one-thread batch measures the model (the cheapest one seen: the
        first also pays for warming up)."""
        if threads == 1 and images:
            per_image = thread_cpu / images
            self.model_cpu = per_image if self.model_cpu is None else min(self.model_cpu, per_image)

    def threads(self, decode_cpu: float | None) -> int:
        """Threads for the next batch, given the decoding CPU seconds an image costs so far (None:
        nothing decoded yet): one until the model is measured, then its share of the cores (all of
        them once decoding is over)."""
        if not self.decoding:
            return self.cores
        if self.cores <= 1 or self.model_cpu is None or decode_cpu is None:
            return 1
        d, m = decode_cpu, self.model_cpu
        share = m / (d + m) if d + m > 0 else 1.0
        return max(1, min(self.cores, round(self.cores * share)))
