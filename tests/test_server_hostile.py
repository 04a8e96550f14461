"""Hostile and oversized requests against the real routing app (uvicorn on loopback, the real router).

Every request here is refused before any backend is called, so the backends are real URLs
on which nothing listens (``dead_url``): a request that wrongly got through would fail with
a 502, which the assertions would catch. Each case is one of the defects of issue 21: the
server used to answer it with a 500 that echoed the exception, or to spend seconds on it.
"""

from __future__ import annotations

import copy
import json
import time

import httpx
import pytest
from conftest import STRONG, WEAK
from llama_servers import dead_url
from server_helpers import running

from difficulty_router.server import BackendSpec, create_app
from difficulty_router.server.schema import Limits

USER = [{"role": "user", "content": "What is the capital of France?"}]


def dead_specs():
    return [BackendSpec(WEAK, dead_url(), "small", timeout=5), BackendSpec(STRONG, dead_url(), "large", timeout=5)]


@pytest.fixture(scope="module")
def server(trained_router):
    limits = Limits(max_body_bytes=200_000, max_messages=20, max_chars=50_000, max_n=4, max_tokens=4096)
    app = create_app(trained_router, dead_specs(), limits=limits)
    with running(app) as url:
        yield url, app


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=30, **kwargs)


def assert_clean_error(response: httpx.Response, status: int, *needles: str, param=None):
    """An OpenAI-style error with the expected status that names the problem and leaks no internals."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    for leak in ("Traceback", "Error:", "File \"", "site-packages", "difficulty_router/"):
        assert leak not in response.text, response.text
    assert response.headers.get("x-request-id")


@pytest.mark.parametrize("body, needle, param", [
    # RecursionError in json.loads used to become a 500 echoing it
    (b'{"model": "router", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested", None),
    # nesting the parser survives but deeper than any chat request
    ({"model": "router", "messages": USER, "metadata": json.loads("[" * 200 + "]" * 200)}, "nested", None),
    # a lone surrogate in 'model' used to raise UnicodeEncodeError while writing the 404
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "Unicode", None),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi \\udfff"}]}', "Unicode", None),
    # malformed tool calls used to raise TypeError / AttributeError in queries.py
    ({"model": "router", "messages": [USER[0], {"role": "assistant", "content": None, "tool_calls": 7}]},
     "tool_calls", "messages[1].tool_calls"),
    ({"model": "router", "messages": [USER[0], {"role": "assistant", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": "get_weather"}]}]}, "function", "messages[1].tool_calls"),
    ({"model": "router", "messages": [USER[0], {"role": "assistant", "content": "x", "tool_calls": ["call"]}]},
     "tool_calls", "messages[1].tool_calls"),
    ({"model": "router", "messages": [USER[0], {"role": "assistant", "content": "x", "tool_calls": [
        {"function": {"name": 5, "arguments": "{}"}}]}]}, "name", "messages[1].tool_calls"),
    # string messages and non-string content parts
    ({"model": "router", "messages": ["hi"]}, "must be an object", "messages[0]"),
    ({"model": "router", "messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]},
     "text", "messages[0].content"),
    ({"model": "router", "messages": [{"role": "user", "content": "hi", "name": {"a": 1}}]}, "name",
     "messages[0].name"),
])
def test_hostile_bodies_get_a_clean_400(server, body, needle, param):
    assert_clean_error(post(server[0], body), 400, needle, param=param)


@pytest.mark.parametrize("body, status, needle, param", [
    ({"model": "router", "messages": USER * 21}, 400, "at most 20 messages", "messages"),
    ({"model": "router", "messages": [{"role": "user", "content": "x" * 60_000}]}, 400, "50000 characters",
     "messages"),
    ({"model": "router", "messages": USER, "n": 5}, 400, "at most 4", "n"),
    ({"model": "router", "messages": USER, "max_tokens": 5000}, 400, "at most 4096", "max_tokens"),
    ({"model": "router", "messages": USER, "max_completion_tokens": 10**12}, 400, "at most 4096",
     "max_completion_tokens"),
])
def test_limits_are_refused_with_a_named_field(server, body, status, needle, param):
    assert_clean_error(post(server[0], body), status, needle, param=param)


def test_an_oversized_body_is_refused_before_it_is_parsed(server):
    body = b'{"model": "router", "messages": [{"role": "user", "content": "' + b"a" * 300_000 + b'"}]}'
    assert_clean_error(post(server[0], body), 413, "200000 bytes")


def test_an_oversized_chunked_body_is_refused(server):
    """No Content-Length to trust: the limit is counted while reading."""
    def chunks():
        yield b'{"model": "router", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 10_000
        yield b'"}]}'
    response = httpx.post(server[0] + "/v1/chat/completions", content=chunks(), timeout=30)
    assert_clean_error(response, 413, "200000 bytes")


def test_every_response_carries_a_request_id(server):
    first = post(server[0], {"model": "nope", "messages": USER})
    second = post(server[0], {"model": "nope", "messages": USER})
    assert first.status_code == second.status_code == 404
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_a_long_prompt_is_clipped_before_routing(trained_router):
    """Within the character limit but far beyond what the extractor reads: routing tokenises only the
    tail the extractor would keep anyway, so a 1 MB prompt costs about what a prompt of that tail does.
    (The extractor here keeps 256 tokens, so the forward pass is short and the tokenising shows.)"""
    from difficulty_router.server.deciding import ROUTE_CHARS_PER_TOKEN

    router = copy.copy(trained_router)
    router.extractor = copy.copy(trained_router.extractor)
    router.extractor.max_tokens = 256
    limits = Limits(max_chars=2_000_000, max_body_bytes=4_000_000)
    app = create_app({"router": router}, dead_specs(), limits=limits)
    words = "lorem ipsum dolor sit amet "
    tail = words * (ROUTE_CHARS_PER_TOKEN * 256 // len(words))
    huge = words * 40_000  # 1.08 MB
    routing = app.state.metrics.routing_latency

    def routing_seconds(text: str) -> float:
        before = routing.sum
        response = post(url, {"model": "router", "messages": [{"role": "user", "content": text}]})
        assert response.status_code == 502  # routed, then the dead backends failed: routing itself succeeded
        return routing.sum - before

    with running(app) as url:
        routing_seconds(tail)  # warm up
        reference = min(routing_seconds(tail) for _ in range(2))
        start = time.perf_counter()
        clipped = routing_seconds(huge)
        elapsed = time.perf_counter() - start
    assert clipped < 1.5 * reference + 0.3, f"routing 1 MB took {clipped:.2f} s, its routed tail {reference:.2f} s"
    assert elapsed < clipped + 2.0, f"answering a 1 MB prompt took {elapsed:.1f} s"


def test_clipping_keeps_the_tail_the_extractor_reads():
    from difficulty_router.data.queries import clip_conversation

    conversation = [{"role": "system", "content": "s" * 50}, {"role": "user", "content": "a" * 30 + "END"}]
    assert clip_conversation(conversation, 100) == (conversation, False)
    clipped, cut = clip_conversation(conversation, 40)
    assert cut and clipped == [{"role": "system", "content": "s" * 7}, {"role": "user", "content": "a" * 30 + "END"}]
    clipped, cut = clip_conversation(conversation, 5)
    assert cut and clipped == [{"role": "user", "content": "aaEND"}]


class RouterProxy:
    """Fault injection (a real router cannot be made to crash or stall on demand): the real trained
    router with one method replaced by a subclass."""

    def __init__(self, router) -> None:
        self.router, self.calls = router, 0

    def __getattr__(self, name):
        return getattr(self.router, name)


class ExplodingRouter(RouterProxy):
    def route_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("secret path /home/alice/.keys in the extractor")
        return self.router.route_batch(*args, **kwargs)


class SlowRouter(RouterProxy):
    def route_batch(self, *args, **kwargs):
        time.sleep(1.0)  # a forward pass held up by a CPU-heavy neighbour
        return self.router.route_batch(*args, **kwargs)


def test_a_crashed_batch_fails_its_callers_with_500_and_routing_goes_on(trained_router, caplog):
    app = create_app({"router": ExplodingRouter(trained_router)}, dead_specs())
    with running(app) as url:
        crashed = post(url, {"model": "router", "messages": USER})
        assert_clean_error(crashed, 500, crashed.headers["x-request-id"])
        assert "secret" not in crashed.text and "RuntimeError" not in crashed.text
        after = post(url, {"model": "router", "messages": USER})
    assert after.status_code == 502 and "every candidate backend failed" in after.json()["error"]["message"]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert crashed.headers["x-request-id"] in logged


@pytest.mark.asyncio
async def test_a_full_queue_sheds_with_429_and_an_expired_deadline_with_503(trained_router):
    """Eight requests at once, one routed at a time, two may wait, each decision takes over 1 s, deadline 1.2 s.

    Whatever the arrival order, at most three are accepted in the first second (so some get 429) and the
    second one accepted cannot be decided before 2 s (so it gets 503). With a 0.5 s decision this failed a
    CI run on a loaded machine: when the batcher had not yet taken the first request as the others arrived,
    only two were accepted and both were decided within 1.2 s, so no deadline passed."""
    import asyncio

    app = create_app({"router": SlowRouter(trained_router)}, dead_specs(), max_batch=1, max_queue=2,
                     route_timeout=1.2)
    with running(app) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            bodies = [{"model": "router", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(8)]
            responses = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=b) for b in bodies))
            metrics = (await client.get(url + "/metrics")).text
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 503 in statuses, statuses
    assert set(statuses) <= {429, 502, 503}
    for r in responses:
        if r.status_code == 429:
            assert_clean_error(r, 429, "busy")
            assert r.headers["retry-after"]
        if r.status_code == 503:
            assert_clean_error(r, 503, "in time")
    assert 'difficulty_router_shed_requests_total{reason="queue_full",router="router"}' in metrics
    assert 'difficulty_router_shed_requests_total{reason="deadline",router="router"}' in metrics


@pytest.mark.asyncio
async def test_an_unauthenticated_app_answers_only_loopback_clients(trained_router):
    """The rule lives in the app: served by any ASGI server on any address, a client from the network
    is refused unless a key is set or the caller said a proxy authenticates."""
    open_app = create_app(trained_router, dead_specs())
    transport = httpx.ASGITransport(app=open_app, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        refused = await client.get("/v1/models")
    assert_clean_error(refused, 403, "loopback")
    proxied = create_app(trained_router, dead_specs(), allow_unauthenticated=True)
    transport = httpx.ASGITransport(app=proxied, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        assert (await client.get("/v1/models")).status_code == 200
    keyed = create_app(trained_router, dead_specs(), api_key="k")
    transport = httpx.ASGITransport(app=keyed, client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        assert (await client.get("/v1/models", headers={"authorization": "Bearer k"})).status_code == 200


def test_serve_refuses_a_public_address_for_an_unauthenticated_app(trained_router):
    from difficulty_router.server.run import serve

    app = create_app(trained_router, dead_specs())
    with pytest.raises(ValueError, match="without authentication"):
        serve(app, "0.0.0.0", 0)
