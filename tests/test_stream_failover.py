"""Stream failover end to end: a backend whose stream breaks mid-way, on real HTTP over loopback.

The server under test is the real app under uvicorn; the healthy backend is a real llama.cpp server
(``llama_backends["large"]``, SmolLM2); the failing one is ``stream_faults.cutting_backend``, a fault
injector: a stock llama.cpp server cannot be told to drop its connection after N chunks, so a small
hand-written HTTP server on a real socket does exactly that (two ``word{i}`` chunks, then the socket
closes without ending the chunked body). The router always picks the cheap model (threshold 0), so
every request meets the fault first and may fall back to the strong one.

What is checked: with the hold-back covering the cut, the client gets the strong model's complete
stream (its own greedy answer, asked directly) and no error event, and the escalation is in the
headers, the metrics and the decision log; with the cut after commit (or the option off, as before)
the stream ends with a well-formed error event and ``[DONE]`` within seconds.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import STRONG, WEAK
from llama_servers import direct_answers
from server_helpers import running, with_policy
from stream_faults import cutting_backend

from difficulty_router import DecisionLog, StreamHoldback, read_log
from difficulty_router.server import Backends, BackendSpec, create_app

MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
BODY = {"model": "router", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True}
NO_HANG_S = 30.0


def app_over(router, weak_url, strong_url, **options):
    cheapest_first = with_policy(router, "threshold", 0.0)  # every request meets the fault first
    specs = [BackendSpec(WEAK, weak_url, "small", timeout=60), BackendSpec(STRONG, strong_url, "large", timeout=60)]
    return create_app(cheapest_first, Backends(specs, cooldown=0), **options)


def read_stream(url: str, body: dict = BODY) -> tuple[int, dict, list[str]]:
    """(status, headers, the raw lines of the body): parsed by hand, so a malformed event shows."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=NO_HANG_S) as response:
        return response.status_code, dict(response.headers), list(response.iter_lines())


def events(lines: list[str]) -> tuple[list[dict], bool]:
    """The JSON events and whether the stream ended with ``[DONE]``; fails on anything not well-formed SSE."""
    payloads = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in payloads), lines
    assert all(line == "" for line in lines[1::2]), f"events must be separated by blank lines: {lines}"
    done = payloads[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in payloads if line != "data: [DONE]"], done


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_a_stream_cut_before_commit_is_answered_whole_by_the_next_model(trained_router, llama_backends, tmp_path):
    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=6)
    log = DecisionLog(tmp_path / "decisions.jsonl")
    with cutting_backend(cut_after=2) as cut:
        app = app_over(
            trained_router, cut.url, llama_backends["large"], stream_holdback=StreamHoldback(chunks=3), decision_log=log
        )
        with running(app) as url:
            status, headers, lines = read_stream(url)
    assert len(cut.requests) == 1 and cut.requests[0]["stream"] is True  # the fault was really met
    chunks, done = events(lines)
    assert status == 200 and done
    assert not any("error" in c for c in chunks), lines  # no trace of the break reaches the client
    assert {c["model"] for c in chunks} == {STRONG}
    assert text_of(chunks) == direct["large"], direct  # the strong backend's own answer, complete
    assert "word0" not in text_of(chunks)
    assert (headers["x-router-decision"], headers["x-router-model"]) == (WEAK, STRONG)
    assert headers["x-router-escalated-from"] == WEAK
    metrics = app.state.metrics
    assert metrics.escalations.get(WEAK, STRONG) == 1
    assert metrics.backend_errors.get(WEAK, "stream_broken") == 1
    assert metrics.requests.get("router", STRONG) == 1
    [record] = list(read_log(log.path))
    assert (record["chosen"], record["served_by"]) == (WEAK, STRONG)


@pytest.mark.parametrize("holdback", [StreamHoldback(chunks=2), None], ids=["cut-after-commit", "option-off"])
def test_a_stream_cut_after_commit_ends_with_a_well_formed_error_event(trained_router, llama_backends, holdback):
    options = {} if holdback is None else {"stream_holdback": holdback}  # None: create_app's default
    with cutting_backend(cut_after=2) as cut:
        app = app_over(trained_router, cut.url, llama_backends["large"], **options)
        with running(app) as url:
            began = time.monotonic()
            status, headers, lines = read_stream(url)
            took = time.monotonic() - began
    chunks, done = events(lines)
    assert status == 200 and done and took < 10, (took, lines)  # ended, not hung
    assert text_of(chunks[:-1]) == "word0 word1 "  # the two chunks shown before the break
    error = chunks[-1]["error"]
    assert (
        error["type"] == "api_error" and error["message"] == f"{WEAK}: the stream broke; the server log has the cause"
    )
    assert headers["x-router-model"] == WEAK and "x-router-escalated-from" not in headers
    metrics = app.state.metrics
    assert metrics.escalations.get(WEAK, STRONG) == 0
    assert metrics.backend_errors.get(WEAK, "stream_broken") == 1


def test_the_time_bound_holds_a_slow_stream_back(trained_router, llama_backends):
    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=6)
    with cutting_backend(cut_after=2, gap_s=0.3) as cut:  # chunk 2 arrives 0.3 s after chunk 1, then the cut
        held = app_over(trained_router, cut.url, llama_backends["large"], stream_holdback=StreamHoldback(ms=3000))
        with running(held) as url:
            _, headers, lines = read_stream(url)
        chunks, done = events(lines)
        assert done and headers["x-router-model"] == STRONG and text_of(chunks) == direct["large"]
        brief = app_over(trained_router, cut.url, llama_backends["large"], stream_holdback=StreamHoldback(ms=100))
        with running(brief) as url:
            _, headers, lines = read_stream(url)
        chunks, done = events(lines)
        assert done and headers["x-router-model"] == WEAK and "error" in chunks[-1]  # committed at chunk 2


def test_every_backend_cut_before_commit_is_one_plain_502(trained_router):
    with cutting_backend(cut_after=2) as weak, cutting_backend(cut_after=2) as strong:
        app = app_over(trained_router, weak.url, strong.url, stream_holdback=StreamHoldback(chunks=3))
        with running(app) as url:
            response = httpx.post(url + "/v1/chat/completions", json=BODY, timeout=NO_HANG_S)
    assert response.status_code == 502 and response.headers["content-type"].startswith("application/json")
    assert "stream broke" in response.json()["error"]["message"]
    assert len(weak.requests) == len(strong.requests) == 1


def test_the_langchain_adapter_fails_over_with_the_same_option(trained_router, llama_backends):
    from langchain_openai import ChatOpenAI

    from langchain_difficulty_router import ChatDifficultyRouter

    def model(url, alias):
        return ChatOpenAI(
            base_url=url, api_key="none", model=alias, temperature=0, max_retries=0, extra_body={"max_tokens": 6}
        )

    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=6)
    with cutting_backend(cut_after=2) as cut:
        chat = ChatDifficultyRouter(
            router=with_policy(trained_router, "threshold", 0.0),
            models={WEAK: model(cut.url, "small"), STRONG: model(llama_backends["large"], "large")},
            stream_holdback=StreamHoldback(chunks=3),
        )
        pieces = list(chat.stream([("system", MESSAGES[0]["content"]), ("user", MESSAGES[1]["content"])]))
    record = pieces[0].response_metadata["difficulty_router"]
    assert "".join(p.content for p in pieces) == direct["large"]
    assert record["served_by"] == STRONG and record["escalated"]
    assert record["attempts"][0]["outcome"] == "failed" and "RemoteProtocolError" in record["attempts"][0]["error"]


def test_the_llamaindex_adapter_fails_over_with_the_same_option_async(trained_router, llama_backends):
    import asyncio

    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    from llamaindex_difficulty_router import DifficultyRouterLLM

    def llm(url, alias):
        return OpenAILike(
            api_base=url,
            model=alias,
            api_key="none",
            is_chat_model=True,
            max_tokens=6,
            temperature=0,
            max_retries=0,
            timeout=60,
            context_window=2048,
        )

    direct = direct_answers(llama_backends, messages=MESSAGES, max_tokens=6)
    question = [ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
    with cutting_backend(cut_after=2) as cut:
        routed = DifficultyRouterLLM(
            router=with_policy(trained_router, "threshold", 0.0),
            llms={WEAK: llm(cut.url, "small"), STRONG: llm(llama_backends["large"], "large")},
            stream_holdback=StreamHoldback(chunks=3),
        )

        async def stream():
            return [c async for c in await routed.astream_chat(question)]

        chunks = asyncio.run(stream())
    assert len(cut.requests) == 1
    assert chunks[-1].message.content == direct["large"] and "word0" not in chunks[-1].message.content
    record = chunks[-1].additional_kwargs["difficulty_router"]
    assert [(a["model"], a["outcome"]) for a in record["attempts"]] == [(WEAK, "failed"), (STRONG, "accepted")]


def test_a_negative_holdback_is_refused_by_serve_before_anything_loads(capsys, tmp_path):
    from difficulty_router.cli.main import main

    code = main(
        ["serve", "--pool", str(tmp_path / "absent.yaml"), "--router", str(tmp_path), "--stream-holdback-chunks", "-1"]
    )
    assert code == 2
    assert "stream hold-back chunks must be an integer >= 0, got -1" in capsys.readouterr().err
