"""The service's Prometheus metrics, in a registry of the app's own (two apps in one process, as
in tests, never collide in the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "retrieval_requests",
            "HTTP requests, by endpoint (route) and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "retrieval_request_seconds",
            "Time from a request's arrival to its response, by endpoint.",
            ["endpoint"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "retrieval_stage_seconds",
            "Time per stage of a batch: decode (uploads), encode, lookup (rows by id), search.",
            ["stage"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.batches = Histogram(
            "retrieval_batch_size",
            "Queries per coalesced batch.",
            buckets=_SIZES,
            registry=self.registry,
        )
        self.versions = Gauge(
            "retrieval_index_generation",
            "The catalog generation each served index answers from.",
            ["index"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "retrieval_index_swaps",
            "Hot swaps to a newer version, by index and outcome (swapped, failed).",
            ["index", "outcome"],
            registry=self.registry,
        )

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stages.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
