"""Valid but hostile bodies through the real server: routed and answered, or refused cleanly (issue 31).

The fuzz of ``test_server_hostile.py`` and the first section of ``benchmarks/reliability.py`` sends bodies
that validation refuses, so none reaches the router. These pass validation (most of them) and carry what
real clients send that code rarely sees (``tests/hostile_bodies.py``: every Unicode category, zero-width and
right-to-left text, huge and deeply nested tool outputs, long conversations, mixed content parts, tool
calls). The server is the real app under uvicorn on loopback with the session's real router; the backends
are the benchmarks' echo stubs (real HTTP servers on loopback), which report a digest of the messages they
received, so a routed answer proves the backend saw the conversation untouched. A dead backend, as in
``test_server_hostile.py``, would turn every routed body into a 502 and hide a server error among them.
The full-size run (10,000 bodies) is ``python benchmarks/reliability.py --valid-fuzz-only``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import httpx
import pytest
from conftest import STRONG, WEAK
from server_helpers import running

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _stub_backend import StubBackend
from hostile_bodies import hostile_body, judge, send_all

from difficulty_router.server import BackendSpec, create_app
from difficulty_router.server.schema import Limits

#: the limits test_server_hostile.py serves under
LIMITS = Limits(max_body_bytes=200_000, max_messages=20, max_chars=50_000, max_n=4, max_tokens=4096)
BODIES = 300


@pytest.fixture(scope="module")
def served(trained_router):
    """(url, app, stubs): the real app on loopback in front of two echo stubs, its router reading 256 tokens
    instead of 2048 (the server is under test, not the extractor's speed on long prompts)."""
    router = copy.copy(trained_router)
    router.extractor = copy.copy(trained_router.extractor)
    router.extractor.max_tokens = 256
    stubs = {m: StubBackend(m).start() for m in (WEAK, STRONG)}
    try:
        app = create_app(router, [BackendSpec(m, s.url, m, timeout=10) for m, s in stubs.items()], limits=LIMITS)
        with running(app) as url:
            yield url, app, stubs
    finally:
        for stub in stubs.values():
            stub.stop()


def test_valid_hostile_bodies_are_routed_or_refused_cleanly(served):
    url, app, stubs = served
    calls_before = sum(s.calls for s in stubs.values())
    decided_before = app.state.metrics.routing_latency.count
    tally = send_all(url, hostile_body(LIMITS, "router", (WEAK, STRONG)), BODIES, workers=4)
    print(f"{tally.sent} bodies in {tally.seconds:.0f} s: {tally.outcomes}, statuses {tally.statuses}")
    assert tally.sent == BODIES
    assert tally.failed == 0, "\n".join(tally.failures)  # no 5xx, hang, dropped connection, leak, mangled answer
    assert tally.reached_routing >= BODIES // 3, tally.outcomes
    answered = tally.outcomes.get("routed", 0) + tally.outcomes.get("direct", 0)
    assert sum(s.calls for s in stubs.values()) - calls_before == answered, "a backend was called for nothing"
    assert app.state.metrics.routing_latency.count - decided_before >= tally.reached_routing


#: bodies the fuzz found a server error with, each once a 500 (and a 500 for the requests batched with it)
REGRESSIONS = [
    # text, then whitespace longer than routing reads: the clipped tail was blank and the router refused it
    [{"role": "system", "content": "What is 2+2?"}, {"role": "user", "content": " " * 5000}],
    [{"role": "user", "content": "Summarise this log." + "\u3000\u2028 " * 3000}],
    [
        {"role": "user", "content": "Which tool?"},
        {"role": "tool", "tool_call_id": "1", "content": "\n" * 9000},
        {"role": "user", "content": " "},
    ],
]


@pytest.mark.parametrize("messages", REGRESSIONS)
def test_found_by_the_fuzz_routed_and_answered(served, messages):
    url, _, _ = served
    body = {"model": "router", "messages": messages}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    verdict = judge(response.status_code, response.headers, response.text, body, "router")
    assert verdict.outcome == "routed" and not verdict.leak, verdict
