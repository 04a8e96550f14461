"""One /metrics over several Ray Serve replicas, without Ray: the snapshot, merge and exposition of
``scale.ray_metrics`` on real ``ServerMetrics``, the staleness bound of the metrics actor's class (run in
this process with a fake clock), and the answer of a replica whose metrics actor cannot be reached.
The same on a real 2-replica Serve: tests/test_ray_scale.py."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from difficulty_router.scale.ray_metrics import (
    MetricsBoardActor,
    ReplicaMetrics,
    coverage,
    merge,
    render,
    snapshot,
)
from difficulty_router.server.metrics import ServerMetrics


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition, parsed back: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _replica(routed: dict[tuple[str, str], int], latencies: list[float], depth: int) -> ServerMetrics:
    metrics = ServerMetrics()
    for (router, model), n in routed.items():
        metrics.routed.inc(router, model, amount=n)
        metrics.requests.inc(router, model, amount=n)
    for seconds in latencies:
        metrics.routing_latency.observe(seconds)
    metrics.errors.inc("429", "rate_limited")
    metrics.track_queue("router", lambda: depth)
    return metrics


@pytest.fixture
def two_replicas():
    a = _replica({("router", "weak"): 3, ("router", "strong"): 1}, [0.002, 0.03, 0.4], depth=2)
    b = _replica({("router", "weak"): 2, ("other", "strong"): 4}, [0.0005, 7.0], depth=5)
    return a, b


def test_one_snapshot_renders_as_the_plain_server(two_replicas):
    """A snapshot is plain data, and merging one alone gives the plain server's exposition byte for byte."""
    a, _ = two_replicas
    snap = snapshot(a.registry)
    assert all(isinstance(v, float) and isinstance(labels, dict) for *_, samples in snap for _, labels, v in samples)
    assert render(merge([snap])) == a.render()


def test_two_snapshots_merge_to_the_sum(two_replicas):
    """Counters, histogram buckets, sums and counts and the queue gauge are summed sample by sample (a
    label set one replica lacks counts as zero there); a _created timestamp is the earliest."""
    a, b = two_replicas
    merged = _samples(render(merge([snapshot(a.registry), snapshot(b.registry)])))
    first, second = _samples(a.render()), _samples(b.render())
    assert set(merged) == set(first) | set(second)
    for key, value in merged.items():
        parts = [s[key] for s in (first, second) if key in s]
        assert value == pytest.approx(min(parts) if key[0].endswith("_created") else sum(parts)), key
    routed = "difficulty_router_routing_decisions_total"
    assert merged[(routed, (("model", "weak"), ("router", "router")))] == 5
    assert merged[(routed, (("model", "strong"), ("router", "other")))] == 4
    latency = "difficulty_router_routing_latency_seconds"
    assert merged[(f"{latency}_count", ())] == 5 and merged[(f"{latency}_bucket", (("le", "+Inf"),))] == 5
    assert merged[(f"{latency}_bucket", (("le", "0.001"),))] == 1  # only b's 0.5 ms
    assert merged[(f"{latency}_sum", ())] == pytest.approx(0.002 + 0.03 + 0.4 + 0.0005 + 7.0)
    assert merged[("difficulty_router_queue_depth", (("router", "router"),))] == 7
    assert merged[("difficulty_router_errors_total", (("status", "429"), ("type", "rate_limited")))] == 2


def test_the_board_drops_a_stale_snapshot_and_keeps_applications_apart(two_replicas):
    """The actor's class (no Ray: called in this process) with a clock set by hand: a replica silent for
    longer than the bound drops out of the totals and their replica count; another application's replica
    never counts; the oldest snapshot's age is reported."""
    a, b = two_replicas
    now = [0.0]
    board = MetricsBoardActor(stale_after_s=10.0, clock=lambda: now[0])
    board.push("app", "a", snapshot(a.registry))
    board.push("other-app", "x", snapshot(a.registry))
    now[0] = 4.0
    totals, replicas, oldest = board.totals("app", "b", snapshot(b.registry))
    assert (replicas, oldest) == (2, 4.0)
    both = _samples(render(merge([snapshot(a.registry), snapshot(b.registry)])))
    assert _samples(render(totals)) == both  # the other application's replica is not in them
    now[0] = 12.0  # a's snapshot is 12 s old now, b's 8 s
    totals, replicas, oldest = board.totals("app", "b", snapshot(b.registry))
    assert (replicas, oldest) == (1, 0.0)
    assert _samples(render(totals)) == _samples(b.render())
    assert board.replicas("app") == ["b"] and board.replicas("other-app") == []  # the stale ones are forgotten
    board.push("app", "gone", snapshot(a.registry))
    now[0] = 30.0
    board.push("app", "c", snapshot(a.registry))  # pushes alone (nobody scrapes) forget the silent replicas too
    assert board.replicas("app") == ["c"]
    with pytest.raises(ValueError, match="stale_after_s must be positive"):
        MetricsBoardActor(stale_after_s=0)


def test_the_coverage_gauges(two_replicas):
    a, _ = two_replicas
    text = render(merge([snapshot(a.registry)]), coverage("difficulty_router", 3, 1.5, merged=True))
    samples = _samples(text)
    assert samples[("difficulty_router_replicas_reporting", ())] == 3
    assert samples[("difficulty_router_metrics_oldest_snapshot_seconds", ())] == 1.5
    assert samples[("difficulty_router_metrics_merged", ())] == 1
    assert text.startswith(a.render())  # the plain names come first, unchanged


def test_a_replica_without_its_metrics_actor_answers_its_own_counts(two_replicas, monkeypatch, caplog):
    """When the actor cannot be found (or does not answer), the scrape answers this replica's counts with
    replicas_reporting 1 and metrics_merged 0, and a warning says so; it does not fail."""
    a, _ = two_replicas
    replica = ReplicaMetrics(a, "metrics/none", "app", "replica-1", timeout_s=0.5)

    def no_actor():
        raise ValueError("Failed to look up actor with name 'metrics/none'")

    monkeypatch.setattr(replica, "_handle", no_actor)  # no Ray here: the lookup fails as it does without the actor
    with caplog.at_level(logging.WARNING, logger="difficulty_router.scale.ray_metrics"):
        text = asyncio.run(replica.text())
    samples = _samples(text)
    assert samples[("difficulty_router_replicas_reporting", ())] == 1
    assert samples[("difficulty_router_metrics_merged", ())] == 0
    assert {k: v for k, v in samples.items() if "metrics_" not in k[0] and "replicas_" not in k[0]} == _samples(
        a.render()
    )
    assert "metrics/none" in caplog.text and "own counts" in caplog.text
