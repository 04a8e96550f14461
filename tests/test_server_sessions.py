"""Sessions and shadow mode over real HTTP: the real openai client -> the routing server (uvicorn,
loopback) -> real llama.cpp backends (SmolLM2-135M), with the session's real trained router.

Which backend served a turn is checked by content (see test_server): each reply is compared with the
answer the backend it names gives when asked directly; ``model`` assertions test the server's label."""

from __future__ import annotations

import random
import time

import pytest
from conftest import STRONG, WEAK
from llama_servers import direct_answers
from server_helpers import running, with_policy
from test_server import ALIAS, openai_client, specs

from difficulty_router.routing.decision_log import DecisionLog, prompt_sha256, read_log
from difficulty_router.server import create_app

QUERIES = [
    "What is 2 + 2?",
    "Prove that the set of prime numbers is infinite, step by step, rigorously.",
    "Name the capital of France.",
    "Explain the second law of thermodynamics in statistical terms.",
]
#: the earlier turns' answers in a transcript (real ones: after a run of "Noted." both backends say "Noted.")
ANSWERS = {
    QUERIES[0]: "4.",
    QUERIES[1]: "If there were finitely many primes, their product plus one would have a prime factor not among them.",
    QUERIES[2]: "Paris.",
}
MAX_TOKENS = 8  # enough for the two backends' greedy answers to differ on every turn (direct_answers checks)


def conversation(turns: int) -> list[dict]:
    """The transcript at ``turns``: earlier questions with short answers, then the next question."""
    messages = [{"role": "system", "content": "You answer in one short sentence."}]
    for q in QUERIES[: turns - 1]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS[q]}]
    return [*messages, {"role": "user", "content": QUERIES[turns - 1]}]


@pytest.fixture(scope="module")
def router(trained_router):
    """The trained router under a threshold between its turns' P(success) of the weak model, so that per-call
    routing sends some turns of the conversation to each model (the fitted policy sends all to the weak one)."""
    p_weak = sorted(trained_router.route(conversation(t)).probabilities[WEAK] for t in range(1, len(QUERIES) + 1))
    return with_policy(trained_router, "threshold", (p_weak[1] + p_weak[2]) / 2)


@pytest.fixture(scope="module")
def per_call_choices(router):
    choices = [router.route(conversation(t)).model for t in range(1, len(QUERIES) + 1)]
    assert len(set(choices)) > 1, f"precondition: per-call routing must differ between turns, got {choices}"
    return choices


@pytest.fixture(scope="module")
def direct(llama_backends) -> list[dict[str, str]]:
    """Per turn, each backend's own greedy answer to that turn's transcript, asked directly (they differ)."""
    return [direct_answers(llama_backends, messages=conversation(t), max_tokens=MAX_TOKENS, repeat=False)
            for t in range(1, len(QUERIES) + 1)]


def ask(client, turn: int, **extra):
    raw = client.chat.completions.with_raw_response.create(
        model="router", messages=conversation(turn), max_tokens=MAX_TOKENS, temperature=0, **extra
    )
    return raw.parse(), raw.headers


def text(completion) -> str:
    return completion.choices[0].message.content


def test_sticky_sessions_stay_on_one_model_while_per_call_moves(router, llama_backends, per_call_choices, direct):
    per_call = create_app(router, specs(llama_backends))
    with running(per_call) as url:
        client = openai_client(url)
        served = [ask(client, t, user="alice")[0] for t in range(1, len(QUERIES) + 1)]
    assert [c.model for c in served] == per_call_choices  # per_call ignores the session: it moves with each turn
    # and each turn was answered by the backend of that turn's choice (the label says so; the content shows it)
    assert [text(c) for c in served] == [d[ALIAS[m]] for d, m in zip(direct, per_call_choices, strict=True)]

    sticky = create_app(router, specs(llama_backends), session_policy="sticky", session_margin=1.0)
    with running(sticky) as url:
        client = openai_client(url)
        alice = [ask(client, t, user="alice") for t in range(1, len(QUERIES) + 1)]
        # the header names the session too, and wins over "user"; bob starts on his own first turn
        bob = [ask(client, t, user="ignored", extra_headers={"X-Session-Id": "bob"}) for t in (2, 3)]
    models = [c.model for c, _ in alice]
    assert models == [per_call_choices[0]] * len(QUERIES)  # the label
    assert [text(c) for c, _ in alice] == [d[ALIAS[per_call_choices[0]]] for d in direct]  # who answered
    assert [h["x-router-session-action"] for _, h in alice] == ["first"] + ["kept"] * (len(QUERIES) - 1)
    assert [h["x-router-session-turn"] for _, h in alice] == ["1", "2", "3", "4"]
    record = alice[1][0].model_extra["router"]
    assert record["session"]["key"] == "alice" and record["session"]["per_call_choice"] == per_call_choices[1]
    assert [c.model for c, _ in bob] == [per_call_choices[1]] * 2
    assert [text(c) for c, _ in bob] == [direct[t - 1][ALIAS[per_call_choices[1]]] for t in (2, 3)]
    assert bob[0][1]["x-router-session-action"] == "first"


def test_a_bad_session_key_gets_a_clear_error(router, llama_backends):
    import openai

    app = create_app(router, specs(llama_backends), session_policy="sticky")
    with running(app) as url, pytest.raises(openai.BadRequestError, match="at most 512 characters"):
        ask(openai_client(url), 1, user="x" * 600)


def test_shadow_mode_serves_the_default_and_logs_the_would_be_choice(
    router, llama_backends, per_call_choices, direct, tmp_path
):
    log_path = tmp_path / "decisions.jsonl"
    app = create_app(
        router,
        specs(llama_backends),
        shadow=STRONG,
        shadow_sample=1.0,
        decision_log=DecisionLog(log_path),
        rng=random.Random(0),
    )
    hello = [{"role": "user", "content": "Say hello."}]
    hello_direct = direct_answers(llama_backends, messages=hello, max_tokens=3, repeat=False)  # streamed after a turn
    with running(app) as url:
        client = openai_client(url)
        answers = [ask(client, t) for t in range(1, len(QUERIES) + 1)]
        stream = client.chat.completions.create(model="router", messages=hello, max_tokens=3, temperature=0,
                                                stream=True)
        chunks = list(stream)
        streamed = {chunk.model for chunk in chunks}
        deadline = time.monotonic() + 120  # the log is written after each response, by a background task
        while (len(log_path.read_text().splitlines()) if log_path.exists() else 0) < len(QUERIES) + 1:
            assert time.monotonic() < deadline, "the decision log did not fill"
            time.sleep(0.1)
    assert {c.model for c, _ in answers} == {STRONG} and streamed == {STRONG}  # the label
    # the default's backend answered every turn and the stream, whatever the would-be choice
    assert [text(c) for c, _ in answers] == [d["large"] for d in direct]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == hello_direct["large"]
    assert [h["x-router-shadow-would-be"] for _, h in answers] == per_call_choices
    lines = {r["prompt_sha256"]: r for r in read_log(log_path)}  # sampled turns finish later: match by prompt
    assert len(lines) == len(QUERIES) + 1 and {r["served_by"] for r in lines.values()} == {STRONG}
    # each response names its logged call: the key a later grade is joined on (difficulty-router feedback)
    assert [h["x-router-query-id"] for _, h in answers] == [
        lines[prompt_sha256(conversation(t))]["query_id"] for t in range(1, len(QUERIES) + 1)
    ]
    for t, choice in enumerate(per_call_choices, 1):
        r = lines[prompt_sha256(conversation(t))]
        assert r["chosen"] == choice and r["shadow"]["would_be"] == choice
        assert r["shadow"]["sampled"] == (choice != STRONG)
        if choice != STRONG:  # the alternative answered too: its answer is the label
            assert r["shadow"]["alternative"] == WEAK and r["shadow"]["alternative_answer"]["completion_tokens"] > 0
    assert lines[prompt_sha256(hello)]["shadow"]["sampled"] is False  # streams are never sampled
    assert QUERIES[0] not in log_path.read_text()  # prompts are hashed, never stored
