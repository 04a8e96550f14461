"""Prometheus text exposition, written by hand: a few counters and histograms need no dependency.

Everything is updated from the event loop thread except batch observations, which the
batcher reports from the loop too (after the worker thread returns), so no locks are needed.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[tuple(labels)] += amount

    def get(self, *labels: str) -> float:
        return self.values.get(tuple(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """The server's metrics: what was asked, what served it, how long routing took, what failed."""

    def __init__(self, prefix: str = "difficulty_router") -> None:
        p = prefix
        self.requests = Counter(f"{p}_requests_total", "Chat completion requests by requested model and the backend "
                                "that answered (none: every candidate failed).", ("requested", "model"))
        self.routed = Counter(f"{p}_routing_decisions_total", "Routing decisions by router and chosen pool model.",
                              ("router", "model"))
        self.escalations = Counter(f"{p}_escalations_total", "Backend failures that moved a request to the next "
                                   "more capable backend.", ("from_model", "to_model"))
        self.backend_errors = Counter(f"{p}_backend_errors_total", "Failed backend calls by backend and kind.",
                                      ("model", "kind"))
        self.errors = Counter(f"{p}_errors_total", "Error responses sent to clients by HTTP status and type.",
                              ("status", "type"))
        self.routing_latency = Histogram(f"{p}_routing_latency_seconds", "Time from a request's arrival at the "
                                         "router to its decision (queueing, batching and extraction).", LATENCY_BUCKETS)
        self.batch_size = Histogram(f"{p}_batch_size", "Queries per extraction forward pass.", BATCH_BUCKETS)
        self.batch_seconds = Histogram(f"{p}_batch_seconds", "Seconds per batched routing call.", LATENCY_BUCKETS)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.routed, self.escalations, self.backend_errors, self.errors,
                       self.routing_latency, self.batch_size, self.batch_seconds):
            lines += metric.render()
        return "\n".join(lines) + "\n"
