"""The server's Prometheus metrics, through ``prometheus_client`` (the exposition format is its job).

Each :class:`ServerMetrics` owns a registry, so several apps in one process (tests, a
benchmark) keep separate counts. The attributes keep a small interface of their own
(``inc(*labels)``, ``get(*labels)``, ``observe``, ``count``, ``sum``) so the app and the
tests read counts without reaching into the library's internals.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as _PromCounter
from prometheus_client import Histogram as _PromHistogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counter:
    """A labelled counter; ``name`` ends in ``_total`` as exposed."""

    def __init__(self, registry: CollectorRegistry, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.labels, self._registry = name, labels, registry
        self._metric = _PromCounter(name, help, labels, registry=registry)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        (self._metric.labels(*map(str, labels)) if self.labels else self._metric).inc(amount)

    def get(self, *labels: str) -> float:
        value = self._registry.get_sample_value(self.name, dict(zip(self.labels, map(str, labels), strict=False)))
        return value or 0.0


class Histogram:
    def __init__(self, registry: CollectorRegistry, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self._registry = name, registry
        self._metric = _PromHistogram(name, help, buckets=buckets, registry=registry)

    def observe(self, value: float) -> None:
        self._metric.observe(value)

    @property
    def count(self) -> int:
        return int(self._registry.get_sample_value(f"{self.name}_count") or 0)

    @property
    def sum(self) -> float:
        return self._registry.get_sample_value(f"{self.name}_sum") or 0.0


class _QueueDepth:
    """Reads each batcher's queue length when scraped, so the gauge is never stale."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sources: dict[str, Callable[[], int]] = {}

    def collect(self):
        gauge = GaugeMetricFamily(self.name, "Routing requests waiting for the extraction worker.", labels=["router"])
        for router, depth in self.sources.items():
            gauge.add_metric([router], depth())
        yield gauge


class ServerMetrics:
    """What was asked, what served it, how long routing took, what failed, what was shed."""

    def __init__(self, prefix: str = "difficulty_router") -> None:
        p, r = prefix, CollectorRegistry(auto_describe=True)
        self.prefix, self.registry = prefix, r
        self.requests = Counter(
            r,
            f"{p}_requests_total",
            "Chat completion requests by requested model and the backend that answered (none: every candidate failed).",
            ("requested", "model"),
        )
        self.routed = Counter(
            r, f"{p}_routing_decisions_total", "Routing decisions by router and chosen pool model.", ("router", "model")
        )
        self.escalations = Counter(
            r,
            f"{p}_escalations_total",
            "Backend failures that moved a request to the next more capable backend.",
            ("from_model", "to_model"),
        )
        self.backend_errors = Counter(
            r, f"{p}_backend_errors_total", "Failed backend calls by backend and kind.", ("model", "kind")
        )
        self.errors = Counter(
            r, f"{p}_errors_total", "Error responses sent to clients by HTTP status and type.", ("status", "type")
        )
        self.shed = Counter(
            r,
            f"{p}_shed_requests_total",
            "Requests refused unrouted because the routing queue "
            "was full (429) or their deadline passed while queued (503).",
            ("router", "reason"),
        )
        self.deadline_expiries = Counter(
            r, f"{p}_deadline_expiries_total", "Requests whose routing deadline passed before a decision.", ("router",)
        )
        self.ood_escalations = Counter(
            r,
            f"{p}_ood_escalations_total",
            "Queries whose read-out was unlike the router's training data and were sent to the most capable model.",
            ("router", "model"),
        )
        self.routing_latency = Histogram(
            r,
            f"{p}_routing_latency_seconds",
            "Time from a request's arrival at the router to its decision (queueing, batching and extraction).",
            LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(r, f"{p}_batch_size", "Queries per extraction forward pass.", BATCH_BUCKETS)
        self.batch_seconds = Histogram(r, f"{p}_batch_seconds", "Seconds per batched routing call.", LATENCY_BUCKETS)
        self._queue_depth = _QueueDepth(f"{p}_queue_depth")
        r.register(self._queue_depth)

    def track_queue(self, router: str, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the router's queue depth at every scrape."""
        self._queue_depth.sources[router] = depth

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
