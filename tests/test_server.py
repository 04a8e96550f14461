"""End to end: the real openai client -> the routing server (uvicorn, loopback) -> real llama.cpp backends.

The backends are llama-cpp-python's OpenAI-compatible server on SmolLM2-135M (the
``llama_backends`` fixture); the router is the session's real trained router. Nothing is
mocked: requests cross real sockets, the extractor runs a real forward pass per batch.

Which backend answered is checked by content: the server writes its own label into ``model`` (and the
x-router-* headers), so those say what the server believes it did. The two backends answer the same
greedy request differently (``llama_backends``: "large" is told to reply in French), and a test compares
the routed reply with what the backend it names returns when asked directly (``direct_answers``, which
fails first if the two backends' answers are alike). ``model`` and header assertions that remain test
the label itself: that the reply, the headers and the decision record agree.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import STRONG, WEAK
from llama_servers import dead_url, direct_answers, free_port, llama_server, smollm2_gguf
from server_helpers import running, with_policy

from difficulty_router.server import Backends, BackendSpec, create_app

MESSAGES = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


#: the llama_backends alias serving each pool model
ALIAS = {WEAK: "small", STRONG: "large"}


def specs(llama_backends, weak_url=None, strong_url=None):
    return [BackendSpec(WEAK, weak_url or llama_backends["small"], "small", timeout=60),
            BackendSpec(STRONG, strong_url or llama_backends["large"], "large", timeout=60)]


def openai_client(url: str, api_key: str = "unused") -> openai.OpenAI:
    """The real openai client pointed at a routing server; no retries, so a failure shows at once."""
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def server(trained_router, llama_backends):
    app = create_app(trained_router, specs(llama_backends))
    with running(app) as url:
        yield url, app


@pytest.fixture
def client(server):
    return openai_client(server[0])


def test_non_stream_routes_and_reports_the_decision(server, client, trained_router, llama_backends):
    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=8)
    raw = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES, max_tokens=8,
                                                            temperature=0)
    completion = raw.parse()
    assert completion.model in (WEAK, STRONG)
    assert raw.headers["x-router-model"] == completion.model == raw.headers["x-router-decision"]  # the label
    assert completion.choices[0].message.content.strip()
    # the backend the decision names is the one that answered: its own answer, not the other's
    assert completion.choices[0].message.content == direct[ALIAS[trained_router.route(MESSAGES).model]], direct
    assert 0 < completion.usage.completion_tokens <= 8
    probabilities = json.loads(raw.headers["x-router-probabilities"])
    expected = trained_router.route(MESSAGES)
    assert completion.model == expected.model
    assert probabilities == pytest.approx({m: round(p, 4) for m, p in expected.probabilities.items()}, abs=2e-4)
    assert float(raw.headers["x-router-latency-ms"]) > 0
    extra = completion.model_extra["router"]
    assert extra["requested"] == "router" and [a["model"] for a in extra["attempts"]] == [completion.model]
    assert extra["decision"]["model"] == expected.model


@pytest.mark.asyncio
async def test_stream_relays_chunks_with_the_routed_model(server, llama_backends):
    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=6)
    client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES, max_tokens=6,
                                                                  temperature=0, stream=True)
    assert raw.headers["content-type"].startswith("text/event-stream")
    routed = raw.headers["x-router-model"]
    chunks = [chunk async for chunk in raw.parse()]
    assert len(chunks) >= 3
    assert {c.model for c in chunks} == {routed}  # the label, on every chunk
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert text == direct[ALIAS[routed]], direct  # streamed by the backend the header names
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    await client.close()


def test_tools_and_tool_choice_reach_the_backend(client):
    """What is checked: llama.cpp honours a named ``tool_choice`` by constraining the output to that
    function's JSON arguments, so a ``get_weather`` call with a ``city`` argument can only come back
    if both ``tools`` and ``tool_choice`` were forwarded. Whether SmolLM2 picks tools well is not.

    Greedy (temperature 0): at llama.cpp's default temperature (0.8) the constrained string can run past the
    token limit, and truncated arguments are not JSON (this failed a CI run); greedy, both backends answer
    ``{"city": "Paris"}`` in under 12 tokens."""
    completion = client.chat.completions.create(
        model="router", messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=40,
        temperature=0,
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)


def test_sampling_fields_pass_through(client):
    completion = client.chat.completions.create(model="router", messages=MESSAGES, max_tokens=3, temperature=0.0,
                                                top_p=0.9, seed=1, stop=["\n\n"])
    assert completion.usage.completion_tokens <= 3
    assert completion.choices[0].finish_reason in ("length", "stop")


def test_a_backend_name_bypasses_routing(client, llama_backends):
    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=4)
    raw = client.chat.completions.with_raw_response.create(model=STRONG, messages=MESSAGES, max_tokens=4,
                                                            temperature=0)
    assert raw.headers["x-router-decision"] == "direct"
    assert raw.headers["x-router-model"] == raw.parse().model == STRONG  # the label
    assert raw.parse().choices[0].message.content == direct["large"], direct  # STRONG's backend answered
    assert "x-router-probabilities" not in raw.headers


def test_models_lists_the_router_and_each_backend(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["router", WEAK, STRONG]


def test_health_and_metrics(server, client):
    client.chat.completions.create(model="router", messages=MESSAGES, max_tokens=2)
    health = httpx.get(server[0] + "/health").json()
    assert health == {"status": "ok", "routers": ["router"], "backends": {WEAK: "up", STRONG: "up"}}
    text = httpx.get(server[0] + "/metrics").text
    assert "# TYPE difficulty_router_requests_total counter" in text
    assert any(line.startswith('difficulty_router_requests_total{model="') and 'requested="router"}' in line
               for line in text.splitlines())
    assert "# TYPE difficulty_router_queue_depth gauge" in text
    assert "difficulty_router_shed_requests_total" in text and "difficulty_router_ood_escalations_total" in text
    assert "difficulty_router_routing_latency_seconds_count" in text
    assert "difficulty_router_replicas_reporting" not in text  # one process: its own counts (Ray Serve sums them)
    metrics = server[1].state.metrics
    assert metrics.routing_latency.count >= 1 and metrics.batch_size.count >= 1


@pytest.mark.asyncio
async def test_concurrent_requests_share_forward_passes(trained_router, llama_backends):
    app = create_app(trained_router, specs(llama_backends), max_wait=0.5, max_batch=32)
    questions = [f"What is {i} plus {i}?" for i in range(2, 10)]  # 1 + 1: both backends start "1 + "
    # asked once each: the routed requests also each follow another of these questions (same token shape,
    # so the same prompt tail is evaluated whichever came before), never a repeat of themselves
    direct = [direct_answers(llama_backends, messages=[{"role": "user", "content": q}], max_tokens=3, repeat=False)
              for q in questions]
    with running(app) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="router", messages=[{"role": "user", "content": q}], max_tokens=3, temperature=0)
            for q in questions))
        await client.close()
    assert all(r.model in (WEAK, STRONG) for r in replies)  # the label
    batches = app.state.metrics.batch_size
    assert batches.sum == 8
    assert batches.count < 8  # fewer forward passes than requests
    expected = [d.model for d in trained_router.route_batch(questions)]
    assert [r.model_extra["router"]["decision"]["model"] for r in replies] == expected
    # each reply came from the backend its decision names
    served = [d[ALIAS[m]] for d, m in zip(direct, expected, strict=True)]
    assert [r.choices[0].message.content for r in replies] == served


def test_fallback_when_the_chosen_backend_is_stopped(trained_router, llama_backends):
    with llama_server(smollm2_gguf(), "small") as doomed:
        pass  # started for real, then stopped: its port now refuses connections
    cheapest_first = with_policy(trained_router, "threshold", 0.0)  # always picks WEAK, the cheaper model
    app = create_app(cheapest_first, Backends(specs(llama_backends, weak_url=doomed), cooldown=0))
    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=4)
    with running(app) as url:
        client = openai_client(url)
        raw = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES, max_tokens=4,
                                                                temperature=0)
        assert raw.headers["x-router-decision"] == WEAK
        assert raw.headers["x-router-model"] == raw.parse().model == STRONG  # the label
        assert raw.parse().choices[0].message.content == direct["large"], direct  # STRONG's backend answered
        assert raw.headers["x-router-escalated-from"] == WEAK
        stream = client.chat.completions.create(model="router", messages=MESSAGES, max_tokens=4, temperature=0,
                                                stream=True)
        chunks = list(stream)
        assert {chunk.model for chunk in chunks} == {STRONG}  # the label
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct["large"]
    metrics = app.state.metrics
    assert metrics.escalations.get(WEAK, STRONG) == 2
    assert metrics.backend_errors.get(WEAK, "connection") == 2
    assert metrics.requests.get("router", STRONG) == 2


def test_a_failed_backend_is_routed_around_while_down(trained_router, llama_backends):
    cheapest_first = with_policy(trained_router, "threshold", 0.0)
    app = create_app(cheapest_first, Backends(specs(llama_backends, weak_url=dead_url()), cooldown=60))
    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=2)
    with running(app) as url:
        client = openai_client(url)
        first = client.chat.completions.create(model="router", messages=MESSAGES, max_tokens=2, temperature=0)
        second = client.chat.completions.with_raw_response.create(model="router", messages=MESSAGES, max_tokens=2,
                                                                   temperature=0)
        health = httpx.get(url + "/health").json()
    # both served by STRONG's backend (the only live one): its own answer
    assert [first.choices[0].message.content, second.parse().choices[0].message.content] == [direct["large"]] * 2
    assert [a["model"] for a in first.model_extra["router"]["attempts"]] == [WEAK, STRONG]
    decision = second.parse().model_extra["router"]["decision"]
    assert decision["model"] == STRONG and WEAK in decision["skipped"]
    assert "x-router-escalated-from" not in second.headers
    assert health["backends"] == {WEAK: "down", STRONG: "up"}


def test_error_only_when_every_backend_fails(trained_router, llama_backends):
    app = create_app(trained_router, specs(llama_backends, weak_url=dead_url(), strong_url=dead_url()))
    with running(app) as url:
        client = openai_client(url)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="router", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 502
    error = info.value.body
    assert error["code"] == "backends_unavailable" and error["type"] == "api_error"
    assert "every candidate backend failed" in error["message"] and "connection failed" in error["message"]
    assert app.state.metrics.requests.get("router", "none") == 1


def test_auth_refuses_requests_without_the_token(trained_router, llama_backends):
    app = create_app(trained_router, specs(llama_backends), api_key="s3cret")
    with running(app) as url:
        anonymous = openai_client(url, "wrong")
        with pytest.raises(openai.AuthenticationError) as info:
            anonymous.chat.completions.create(model="router", messages=MESSAGES, max_tokens=2)
        assert info.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401  # auth before validation
        assert httpx.get(url + "/health").status_code == 200
        allowed = openai_client(url, "s3cret")
        # served at all (the label suffices: which backend answered is not what this test is about)
        assert allowed.chat.completions.create(model="router", messages=MESSAGES, max_tokens=2).model in (WEAK, STRONG)


@pytest.mark.parametrize("body, status, param, needle", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"", 400, None, "body is empty"),
    (b'["model", "router"]', 400, None, "must be a JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model", "provide a model"),
    (b'{"model": "router"}', 400, "messages", "missing required parameter: 'messages'"),
    (b'{"model": "router", "messages": []}', 400, "messages", "non-empty list"),
    (b'{"model": "router", "messages": "hi"}', 400, "messages", "non-empty list"),
    (b'{"model": "router", "messages": [{"content": "hi"}]}', 400, "messages[0].role", "has no 'role'"),
    (b'{"model": "router", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role", "wizard"),
    (b'{"model": "router", "messages": [{"role": "user", "content": 42}]}', 400, "messages[0].content", "string"),
    (b'{"model": "router", "messages": [{"role": "user", "content": "  "}]}', 400, "messages", "empty"),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream", "true or false"),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature", "number"),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens", "positive integer"),
    (b'{"model": "router", "messages": [{"role": "user", "content": "hi"}], "tools": {"a": 1}}', 400, "tools", "list of tool"),
    (b'{"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}', 404, "model", '"gpt-5" does not exist'),
])
def test_malformed_requests_get_a_clear_openai_style_error(server, body, status, param, needle):
    response = httpx.post(server[0] + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_serve_command_end_to_end(trained_router, llama_backends, tmp_path):
    """`difficulty-router serve` as a user starts it: a saved router, a pool file with base_urls."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    trained_router.save(tmp_path / "router")
    (tmp_path / "pool.yaml").write_text(
        f"models:\n"
        f"  - {{name: {WEAK}, cost_per_query: 0.0006, base_url: '{llama_backends['small']}', model: small}}\n"
        f"  - {{name: {STRONG}, cost_per_query: 0.03, base_url: '{llama_backends['large']}', model: large, timeout: 30}}\n")
    port = free_port()
    cli = Path(sys.executable).with_name("difficulty-router")
    process = subprocess.Popen([str(cli), "serve", "--router", str(tmp_path / "router"), "--pool",
                                str(tmp_path / "pool.yaml"), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.3)
        client = openai_client(f"http://127.0.0.1:{port}")
        completion = client.chat.completions.create(model="router", messages=MESSAGES, max_tokens=3, temperature=0)
        chosen = trained_router.route(MESSAGES).model
        assert completion.model == chosen  # the label
        direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=3)
        assert completion.choices[0].message.content == direct[ALIAS[chosen]], direct  # and who answered
        assert [m.id for m in client.models.list().data] == ["router", WEAK, STRONG]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"serving http://127.0.0.1:{port}/v1 (auth off)" in output
