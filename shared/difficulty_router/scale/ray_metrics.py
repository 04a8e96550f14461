"""One ``/metrics`` over every Ray Serve replica: a named Ray actor holds each replica's latest counts.

Each replica keeps its own :class:`~difficulty_router.server.metrics.ServerMetrics` (counting stays
in-process and lock-cheap). A thread in each replica sends a snapshot of them as plain data (family
name, type, help, samples: no pickled registry) to one detached actor per application,
``metrics/<app>``, every :data:`PUSH_EVERY_S`; a scrape sends a fresh one and gets back the totals of
every replica still reporting, so ``/metrics`` on any replica answers the same sums in the Prometheus
text format: counters, histogram buckets, sums and counts and gauges (the queue depth) are added up,
a ``_created`` timestamp is the earliest. Three gauges say what the totals cover:
``difficulty_router_replicas_reporting`` (replicas whose snapshot is in them),
``difficulty_router_metrics_oldest_snapshot_seconds`` (the age of the oldest of those snapshots) and
``difficulty_router_metrics_merged`` (1: the totals came from the actor; 0: it could not be reached and
the replica answered its own counts alone, with a warning in its log; a scrape never fails for it).

A replica that stops reporting (it died, or was scaled down) drops out of the totals once its snapshot
is older than :data:`STALE_AFTER_S`, and its counts vanish from them with it; a replica Ray starts in its
place counts from zero. The totals can therefore go down: Prometheus treats a fall of a counter as a
reset (``rate`` and ``increase`` handle it), which is the scraper's business, as it is for one process
that restarts. Snapshots are keyed by the Serve application and replica that sent them, so several
applications that share one actor (built under one ``app_name``) keep separate totals. The actor keeps
them in memory only; if it dies, Ray restarts it empty and it fills again within a push interval.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from difficulty_router.scale.named_actors import call_named_actor, drop_named_actor, find_named_actor, start_named_actor

#: how often each replica sends its snapshot to the metrics actor
PUSH_EVERY_S = 1.0
#: a replica whose latest snapshot is older than this is left out of the totals (and forgotten)
STALE_AFTER_S = 10.0
#: how long a scrape or a push waits for the metrics actor before the replica answers alone
CALL_TIMEOUT_S = 2.0

#: one sample: its name, its labels, its value
Sample = tuple[str, dict[str, str], float]
#: one metric family: its name, its type, its help and its samples
Family = tuple[str, str, str, list[Sample]]
#: a registry's metrics as plain data (lists, dicts, strings and floats)
Snapshot = list[Family]

log = logging.getLogger(__name__)


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """The registry's metric families as plain data, in their exposition order."""
    return [
        (f.name, f.type, f.documentation, [(s.name, dict(s.labels), float(s.value)) for s in f.samples])
        for f in registry.collect()
    ]


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The totals of several snapshots: each sample (name and labels) is summed over the snapshots that hold
    it, except a ``_created`` timestamp, which is the earliest. Families and samples keep the order in which
    they first appear, so one snapshot merges to itself."""
    families: dict[str, tuple[str, str, dict[tuple, Sample]]] = {}
    for snap in snapshots:
        for name, typ, doc, samples in snap:
            _, _, merged = families.setdefault(name, (typ, doc, {}))
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(labels.items()))
                held = merged.get(key)
                if held is None:
                    merged[key] = (sample_name, dict(labels), value)
                else:
                    total = min(held[2], value) if sample_name == f"{name}_created" else held[2] + value
                    merged[key] = (sample_name, held[1], total)
    return [(name, typ, doc, list(samples.values())) for name, (typ, doc, samples) in families.items()]


class _Families:
    """A collector that yields fixed metric families (the merged totals) once."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families


def render(families: Snapshot, extra: Iterable[Metric] = ()) -> str:
    """The Prometheus text exposition of ``families`` (then ``extra``), as ``prometheus_client`` writes it."""
    metrics = []
    for name, typ, doc, samples in families:
        metric = Metric(name, doc, typ)
        for sample_name, labels, value in samples:
            metric.add_sample(sample_name, labels, value)
        metrics.append(metric)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*metrics, *extra]))
    return generate_latest(registry).decode()


def coverage(prefix: str, replicas: int, oldest_age_s: float, merged: bool) -> list[Metric]:
    """The gauges that say what a replica's ``/metrics`` covers."""
    return [
        GaugeMetricFamily(
            f"{prefix}_replicas_reporting",
            "Replicas whose latest metrics snapshot is in these totals.",
            value=replicas,
        ),
        GaugeMetricFamily(
            f"{prefix}_metrics_oldest_snapshot_seconds",
            "Age of the oldest replica snapshot in these totals.",
            value=oldest_age_s,
        ),
        GaugeMetricFamily(
            f"{prefix}_metrics_merged",
            "1: the totals of every replica reporting to the metrics actor; 0: the actor could not be reached "
            "and these are the answering replica's own counts.",
            value=1 if merged else 0,
        ),
    ]


class MetricsBoardActor:
    """The Ray actor: each replica's latest snapshot, keyed by (application, replica), with the time it came
    (the actor's own clock, so replicas on other machines need no synchronised clocks). A sync actor."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s!r}")
        self.stale_after_s, self.clock = float(stale_after_s), clock
        self.snapshots: dict[tuple[str, str], tuple[float, Snapshot]] = {}

    def settings(self) -> dict[str, Any]:
        return {"stale_after_s": self.stale_after_s}

    def push(self, group: str, replica: str, snap: Snapshot) -> None:
        """Keep ``replica``'s latest snapshot, and forget the stale ones (so replicas that came and went do not
        pile up in the actor when nobody scrapes)."""
        now = self.clock()
        self.snapshots[(group, replica)] = (now, snap)
        for key in [k for k, (at, _) in self.snapshots.items() if now - at > self.stale_after_s]:
            del self.snapshots[key]

    def totals(self, group: str, replica: str, snap: Snapshot) -> tuple[Snapshot, int, float]:
        """Take ``replica``'s fresh snapshot, forget the stale ones, and return the totals of ``group``'s
        replicas with how many they are and the age of the oldest snapshot among them."""
        self.push(group, replica, snap)
        now = self.clock()
        live = [(at, s) for (g, _), (at, s) in self.snapshots.items() if g == group]
        return merge(s for _, s in live), len(live), now - min(at for at, _ in live)

    def replicas(self, group: str) -> list[str]:
        """The replicas of ``group`` with a snapshot held (stale ones included until the next totals)."""
        return sorted(r for g, r in self.snapshots if g == group)


def metrics_board_name(app_name: str) -> str:
    return f"metrics/{app_name}"


def start_metrics_board(name: str, *, stale_after_s: float = STALE_AFTER_S) -> None:
    """Start the metrics actor ``name`` (or find the running one); one left by an earlier deployment with
    another staleness bound is refused, naming it."""
    MetricsBoardActor(stale_after_s)  # its own check, with its message
    start_named_actor(
        MetricsBoardActor,
        name,
        (stale_after_s,),
        {"stale_after_s": float(stale_after_s)},
        what="metrics actor",
        drop_hint=f"difficulty_router.scale.ray_metrics.drop_metrics_board({name!r}) or serve with its settings",
    )


def drop_metrics_board(name: str) -> bool:
    """End the metrics actor ``name`` (the replicas then answer their own counts); True when one was running."""
    return drop_named_actor(name)


class ReplicaMetrics:
    """One replica's side: sends snapshots of ``metrics`` to the actor ``board`` every ``every_s`` (a daemon
    thread, off the event loop; :meth:`start`, :meth:`close`) and answers a scrape with the totals of
    ``group``'s replicas (:meth:`text`, the app's ``metrics_text``), or its own counts when the actor does not
    answer within ``timeout_s``."""

    def __init__(
        self,
        metrics: Any,  # a ServerMetrics: its registry and prefix
        board: str,
        group: str,
        replica: str,
        *,
        every_s: float = PUSH_EVERY_S,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self.metrics, self.board, self.group, self.replica = metrics, board, group, replica
        self.every_s, self.timeout_s = float(every_s), float(timeout_s)
        self._actor: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._push_failing = False

    def _handle(self):
        if self._actor is None:  # a ValueError naming the actor when there is none
            self._actor = find_named_actor(self.board, what="metrics actor", hint="build_app starts it")
        return self._actor

    def push(self) -> None:
        """Send one snapshot now and wait for the actor (at most ``timeout_s``); raises when it fails."""
        try:
            call_named_actor(
                self._handle().push,
                self.group,
                self.replica,
                snapshot(self.metrics.registry),
                name=self.board,
                what="metrics actor",
                timeout_s=self.timeout_s,
            )
        except Exception:
            self._actor = None  # look it up again next time (it may have been dropped and started anew)
            raise

    def _push_loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.push()
            except Exception as exc:  # noqa: BLE001 (a lost push is retried next interval; the thread lives on)
                if not self._push_failing:  # once per run of failures, not every second
                    log.warning("replica %s: cannot send metrics to %r (%s); retrying", self.replica, self.board, exc)
                self._push_failing = True
            else:
                if self._push_failing:
                    log.warning("replica %s: sending metrics to %r again", self.replica, self.board)
                self._push_failing = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._push_loop, name="metrics-push", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    async def text(self) -> str:
        """The exposition ``/metrics`` answers: every reporting replica's totals, or this replica's own counts
        with ``<prefix>_metrics_merged 0`` (and a warning logged) when the actor cannot be reached."""
        own = snapshot(self.metrics.registry)
        prefix = self.metrics.prefix
        try:
            actor = self._actor if self._actor is not None else await asyncio.to_thread(self._handle)
            ref = actor.totals.remote(self.group, self.replica, own)
            totals, replicas, oldest = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 (whatever keeps the actor away, a scrape answers, never a 500)
            self._actor = None
            log.warning(
                "replica %s: the metrics actor %r did not answer (%s): /metrics answers this replica's own counts "
                "(%s_metrics_merged 0)",
                self.replica,
                self.board,
                str(exc) or type(exc).__name__,
                prefix,
            )
            return render(own, coverage(prefix, 1, 0.0, merged=False))
        return render(totals, coverage(prefix, replicas, oldest, merged=True))


__all__ = [
    "MetricsBoardActor",
    "ReplicaMetrics",
    "drop_metrics_board",
    "merge",
    "metrics_board_name",
    "render",
    "snapshot",
    "start_metrics_board",
]
