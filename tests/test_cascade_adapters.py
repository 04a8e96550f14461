"""Cascade mode in the LangChain and LlamaIndex adapters, against real OpenAI-compatible backends.

The rungs are two llama-cpp-python servers on SmolLM2-135M (``llama_backends``), called
through the real framework clients (langchain-openai's ChatOpenAI, LlamaIndex's OpenAILike)
with logprobs on. The rungs also differ in answer length (3 and 6 new tokens, greedy): which
rung answered shows in the text.

P(T) is checked against the servers themselves: each rung's completion of QUESTION is asked of
its server directly (the OpenAI SDK, no adapter) with logprobs, and P(T) is worked out from those
logprobs by the rule confidence.py documents (written out here, not called). Every P(T) an adapter
reports must equal that value, and the accept/escalate tests put the threshold halfway between the
two rungs' measured P(T) (under a reduction whose values order the rungs as the test needs), so the
cascade's verdict at the first rung follows from the measured P(T) and nothing else: a P(T) on the
wrong side of it, or from the wrong rung or reduction, changes the outcome.

Greedy decoding is deterministic on llama.cpp only once a prompt is in the server's KV cache: the
first request after another prompt evaluates the prompt in one batch, later ones reuse its cache and
re-evaluate the last token alone, which moves logprobs by ~0.05 and can change the greedy text. So
``warm_backends`` sends QUESTION to each server once before anything is measured or compared.
"""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.openai_like import OpenAILike
from llama_servers import dead_url

from difficulty_router.calling.cascade_policy import CascadePolicy
from difficulty_router.calling.confidence import REDUCTIONS, MissingLogprobsError, answer_confidence
from langchain_difficulty_router import RECORD_KEY, ChatDifficultyRouter
from llamaindex_difficulty_router import ROUTING_KEY, DifficultyRouterLLM

SMALL, LARGE = "small", "large"
TOKENS = {SMALL: 3, LARGE: 6}
QUESTION = "What is the capital of France?"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"


#: how far apart the two rungs' P(T) must be for a threshold between them to mean anything
MIN_GAP = 0.01
#: how closely a reported P(T) must match the one worked out from the server's own logprobs
PT_REL = 1e-6


def policy(threshold: float = 0.5, **kwargs) -> CascadePolicy:
    return CascadePolicy(ladder=[SMALL, LARGE], pt_threshold=threshold, **kwargs)


def documented_pt(tokens: list[str], logprobs: list[float], reduce: str) -> float:
    """P(T) by the rule confidence.py documents, written out rather than called: the answer span is the
    generated tokens without the leading whitespace-only ones (a reply of only whitespace keeps its last
    token); P(T) is exp of the span's first, mean or minimum log-probability, capped at 1."""
    start = 0
    while start < len(tokens) - 1 and not tokens[start].strip():
        start += 1
    span = logprobs[start:]
    value = {"first": span[0], "mean": sum(span) / len(span), "min": min(span)}[reduce]
    return min(1.0, math.exp(value))


@pytest.fixture(scope="module")
def warm_backends(llama_backends):
    """The servers, each after one request of QUESTION: from here on its greedy answer and logprobs repeat."""
    for alias, url in llama_backends.items():
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        client.chat.completions.create(
            model=alias, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=TOKENS[alias]
        )
    return llama_backends


@pytest.fixture(scope="module")
def backend_answers(warm_backends):
    """``{alias: (text, tokens, logprobs)}``: each rung's completion of QUESTION (its token limit, greedy,
    logprobs on, as the adapters ask), asked of its server directly. Asked twice: the repeat must match,
    the precondition of comparing an adapter's P(T) with these."""
    out = {}
    for alias, url in warm_backends.items():
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

        def ask(alias=alias, client=client):
            choice = client.chat.completions.create(
                model=alias,
                messages=[{"role": "user", "content": QUESTION}],
                temperature=0,
                max_tokens=TOKENS[alias],
                logprobs=True,
                top_logprobs=1,
            ).choices[0]
            entries = choice.logprobs.content
            return choice.message.content, [e.token for e in entries], [e.logprob for e in entries]

        first, again = ask(), ask()
        assert first == again, f"precondition: {alias}'s greedy completion must repeat, got {first} then {again}"
        assert len(first[2]) == TOKENS[alias]
        out[alias] = first
    return out


@pytest.fixture(scope="module")
def backend_pt(backend_answers):
    """``{reduce: {alias: P(T)}}`` from the servers' own logprobs."""
    out = {}
    for reduce in REDUCTIONS:
        out[reduce] = {}
        for alias, (_, tokens, logprobs) in backend_answers.items():
            value = documented_pt(tokens, logprobs, reduce)
            assert 0 < value < 1
            assert answer_confidence(logprobs, reduce, tokens) == pytest.approx(value, rel=1e-12)
            out[reduce][alias] = value
    return out


def between(backend_pt, *, small_above: bool) -> tuple[str, float, dict[str, float]]:
    """A reduction under which the small rung's measured P(T) is above (``small_above``) or below the large
    rung's by at least MIN_GAP, the threshold halfway between the two, and both P(T) under it. With that
    threshold the small rung is accepted exactly when ``small_above``."""
    for reduce in REDUCTIONS:
        pts = backend_pt[reduce]
        gap = pts[SMALL] - pts[LARGE]
        if (gap if small_above else -gap) >= MIN_GAP:
            return reduce, (pts[SMALL] + pts[LARGE]) / 2, pts
    pytest.fail(
        f"precondition: no reduction puts the small rung's P(T) {'above' if small_above else 'below'} "
        f"the large rung's by {MIN_GAP}: {backend_pt}"
    )


def check_pt(value, expected: float) -> None:
    """A reported P(T) is the one worked out from that rung's own logprobs."""
    assert value == pytest.approx(expected, rel=PT_REL)


# --------------------------------------------------------------------------------------
# LangChain
# --------------------------------------------------------------------------------------
def chat_openai(base_url: str, alias: str, *, logprobs: bool = True, max_tokens: int | None = None) -> ChatOpenAI:
    # llama-cpp-python 0.3.36 ignores max_completion_tokens (what ChatOpenAI sends for max_tokens),
    # so the limit goes in the body under the older name.
    extra = {"logprobs": True, "top_logprobs": 1} if logprobs else {}
    return ChatOpenAI(
        base_url=base_url,
        api_key="unused",
        model=alias,
        temperature=0,
        max_retries=0,
        extra_body={"max_tokens": max_tokens or TOKENS[alias]},
        **extra,
    )


@pytest.fixture(scope="module")
def lc_models(llama_backends):
    return {alias: chat_openai(url, alias) for alias, url in llama_backends.items()}


@pytest.fixture(scope="module")
def lc_direct(lc_models, backend_answers):
    """Each rung's own answer, called directly (greedy, so the cascade must reproduce it)."""
    out = {alias: model.invoke(QUESTION).text for alias, model in lc_models.items()}
    assert out == {
        alias: text for alias, (text, _, _) in backend_answers.items()
    }  # the completion P(T) was measured on
    return out


def test_langchain_accepts_first_rung(lc_models, lc_direct, backend_pt):
    reduce, tau, pts = between(backend_pt, small_above=True)
    chat = ChatDifficultyRouter(models=lc_models, cascade=policy(tau, reduce=reduce))
    message = chat.invoke([HumanMessage(QUESTION)])
    assert message.text == lc_direct[SMALL]
    record = message.response_metadata[RECORD_KEY]
    assert record["served_by"] == SMALL and record["chosen"] == SMALL and not record["escalated"]
    (attempt,) = record["attempts"]
    assert attempt["model"] == SMALL and (attempt["outcome"] == "accepted") and attempt["text"] == lc_direct[SMALL]
    check_pt(attempt["pt"], pts[SMALL])
    assert attempt["reason"] == f"P(T) {pts[SMALL]:.3f} >= {tau:g}"
    assert attempt["completion_tokens"] == TOKENS[SMALL] and attempt["prompt_tokens"] > 0
    assert message.response_metadata["difficulty_router"]["served_by"] == SMALL


def test_langchain_escalates_to_second_rung(lc_models, lc_direct, backend_pt):
    reduce, tau, pts = between(backend_pt, small_above=False)
    chat = ChatDifficultyRouter(models=lc_models, cascade=policy(tau, reduce=reduce))
    message = chat.invoke(QUESTION)
    assert message.text == lc_direct[LARGE]
    record = message.response_metadata[RECORD_KEY]
    assert record["served_by"] == LARGE and record["escalated"]
    first, second = record["attempts"]
    assert (first["model"], (first["outcome"] == "accepted"), first["text"]) == (SMALL, False, lc_direct[SMALL])
    assert first["reason"] == f"P(T) {pts[SMALL]:.3f} < {tau:g}"
    assert (second["model"], (second["outcome"] == "accepted"), second["reason"]) == (LARGE, True, "top of the ladder")
    check_pt(first["pt"], pts[SMALL])
    check_pt(second["pt"], pts[LARGE])
    meta = message.response_metadata["difficulty_router"]
    assert meta["served_by"] == LARGE and meta["escalated"] and [a["model"] for a in meta["attempts"]] == [SMALL, LARGE]
    # usage_metadata counts the rejected rung's tokens too: what the call really cost
    assert message.usage_metadata["input_tokens"] == first["prompt_tokens"] + second["prompt_tokens"] > 0
    assert message.usage_metadata["output_tokens"] == first["completion_tokens"] + second["completion_tokens"]
    assert meta["usage"]["total_tokens"] == message.usage_metadata["total_tokens"]


def test_langchain_stream_emits_only_the_accepted_rung(lc_models, lc_direct, backend_pt):
    reduce, tau, pts = between(backend_pt, small_above=False)
    chat = ChatDifficultyRouter(models=lc_models, cascade=policy(tau, reduce=reduce))
    chunks = list(chat.stream(QUESTION))
    direct = list(lc_models[LARGE].stream(QUESTION))
    assert "".join(c.text for c in chunks) == lc_direct[LARGE]  # the small rung's answer is not in the stream
    assert [c.text for c in chunks] == [c.text for c in direct]
    record = chunks[0].response_metadata[RECORD_KEY]
    assert [a["model"] for a in record["attempts"]] == [SMALL, LARGE]
    check_pt(record["attempts"][0]["pt"], pts[SMALL])  # P(T) from the streamed chunks
    check_pt(record["attempts"][1]["pt"], pts[LARGE])
    assert all(RECORD_KEY not in c.response_metadata for c in chunks[1:])


def test_langchain_async_and_streaming_flag(lc_models, lc_direct):
    chat = ChatDifficultyRouter(models=lc_models, cascade=policy(1.0))

    async def go():
        message = await chat.ainvoke(QUESTION)
        chunks = [c async for c in chat.astream(QUESTION)]
        return message, chunks

    message, chunks = asyncio.run(go())
    assert message.text == lc_direct[LARGE]
    assert "".join(c.text for c in chunks) == lc_direct[LARGE]
    assert [a["model"] for a in chunks[0].response_metadata[RECORD_KEY]["attempts"]] == [SMALL, LARGE]
    # streaming=True: invoke goes through the buffered stream and still returns the accepted rung
    streamed = ChatDifficultyRouter(models=lc_models, cascade=policy(0.0), streaming=True).invoke(QUESTION)
    assert streamed.text == lc_direct[SMALL]
    assert streamed.response_metadata[RECORD_KEY]["served_by"] == SMALL


def test_langchain_missing_logprobs(llama_backends, lc_models, lc_direct):
    models = {SMALL: chat_openai(llama_backends[SMALL], SMALL, logprobs=False), LARGE: lc_models[LARGE]}
    with pytest.raises(MissingLogprobsError, match="no logprobs"):
        ChatDifficultyRouter(models=models, cascade=policy(0.0)).invoke(QUESTION)
    message = ChatDifficultyRouter(models=models, cascade=policy(0.0, on_missing_logprobs="escalate")).invoke(QUESTION)
    assert message.text == lc_direct[LARGE]
    first, second = message.response_metadata[RECORD_KEY]["attempts"]
    assert first["pt"] is None and first["reason"] == "no logprobs: escalating" and (second["outcome"] == "accepted")


def test_langchain_validates_ladder_and_scorers(lc_models):
    with pytest.raises(ValueError, match=r"ladder names \['medium'\].*not among the configured models"):
        ChatDifficultyRouter(models=lc_models, cascade=CascadePolicy(ladder=[SMALL, "medium"]))
    with pytest.raises(ValueError, match="needs a router, a cascade policy, or both"):
        ChatDifficultyRouter(models=lc_models)
    with pytest.raises(ValueError, match="uses P\\(IK\\) but rungs \\['small'\\]"):
        ChatDifficultyRouter(models=lc_models, cascade=policy(signals=("pik",)))
    with pytest.raises(ValueError, match="needs a router"):
        ChatDifficultyRouter(models=lc_models, cascade=policy(), skip_threshold=0.5)


def test_langchain_pik_scorer(lc_models, lc_direct):
    seen = []

    def scorer(conversation):
        seen.append(conversation)
        return 0.9 if len(seen) == 1 else 0.2

    chat = ChatDifficultyRouter(
        models=lc_models, pik_scorers={SMALL: scorer}, cascade=policy(0.0, signals=("pt", "pik"), pik_threshold=0.5)
    )
    accepted = chat.invoke(QUESTION).response_metadata[RECORD_KEY]
    assert seen[0] == [{"role": "user", "content": QUESTION}]
    assert [(a["model"], a["pik"], (a["outcome"] == "accepted")) for a in accepted["attempts"]] == [(SMALL, 0.9, True)]
    escalated = chat.invoke(QUESTION)
    first, second = escalated.response_metadata[RECORD_KEY]["attempts"]
    assert first["pik"] == 0.2 and first["reason"] == "P(IK) 0.200 < 0.5" and second["model"] == LARGE
    assert escalated.text == lc_direct[LARGE]


def test_langchain_hybrid_start(trained_router, llama_backends, lc_direct):
    """With a router and skip_threshold, the pre-generation decision picks the start rung."""
    models = {WEAK: chat_openai(llama_backends[SMALL], SMALL), STRONG: chat_openai(llama_backends[LARGE], LARGE)}
    cascade = CascadePolicy(ladder=[WEAK, STRONG], pt_threshold=0.0)
    low = ChatDifficultyRouter(router=trained_router, models=models, cascade=cascade, skip_threshold=0.0)
    record = low.invoke(QUESTION).response_metadata[RECORD_KEY]
    assert record["chosen"] == WEAK and record["decision"]["model"] in (WEAK, STRONG)
    high = ChatDifficultyRouter(router=trained_router, models=models, cascade=cascade, skip_threshold=1.0)
    message = high.invoke(QUESTION)
    record = message.response_metadata[RECORD_KEY]
    assert record["chosen"] == STRONG and [a["model"] for a in record["attempts"]] == [STRONG]
    assert message.text == lc_direct[LARGE]
    assert record["attempts"][0]["cost"] > 0  # priced from the router's pool and the real token counts


# --------------------------------------------------------------------------------------
# LlamaIndex
# --------------------------------------------------------------------------------------
def openai_like(base_url: str, alias: str, *, logprobs: bool = True) -> OpenAILike:
    return OpenAILike(
        api_base=base_url,
        api_key="unused",
        model=alias,
        is_chat_model=True,
        logprobs=logprobs,
        top_logprobs=1,
        max_tokens=TOKENS[alias],
        temperature=0,
        context_window=2048,
        max_retries=0,
    )


@pytest.fixture(scope="module")
def li_llms(llama_backends):
    return {alias: openai_like(url, alias) for alias, url in llama_backends.items()}


@pytest.fixture(scope="module")
def li_direct(li_llms, backend_answers):
    messages = [ChatMessage(role="user", content=QUESTION)]
    out = {alias: llm.chat(messages).message.content for alias, llm in li_llms.items()}
    assert out == {
        alias: text for alias, (text, _, _) in backend_answers.items()
    }  # the completion P(T) was measured on
    return out


MESSAGES = [ChatMessage(role="user", content=QUESTION)]


def test_llamaindex_accepts_first_rung(li_llms, li_direct, backend_pt):
    reduce, tau, pts = between(backend_pt, small_above=True)
    llm = DifficultyRouterLLM(llms=li_llms, cascade=policy(tau, reduce=reduce))
    response = llm.chat(MESSAGES)
    assert response.message.content == li_direct[SMALL]
    record = response.additional_kwargs[RECORD_KEY]
    (attempt,) = record["attempts"]
    assert (
        attempt["model"] == SMALL
        and (attempt["outcome"] == "accepted")
        and attempt["completion_tokens"] == TOKENS[SMALL]
    )
    check_pt(attempt["pt"], pts[SMALL])
    assert attempt["reason"] == f"P(T) {pts[SMALL]:.3f} >= {tau:g}"
    assert response.additional_kwargs[ROUTING_KEY]["served_by"] == SMALL


def test_llamaindex_escalates_chat_and_complete(li_llms, li_direct, backend_pt):
    reduce, tau, pts = between(backend_pt, small_above=False)
    llm = DifficultyRouterLLM(llms=li_llms, cascade=policy(tau, reduce=reduce))
    response = llm.chat(MESSAGES)
    assert response.message.content == li_direct[LARGE]
    first, second = response.additional_kwargs[RECORD_KEY]["attempts"]
    assert (first["model"], (first["outcome"] == "accepted"), first["text"]) == (SMALL, False, li_direct[SMALL])
    assert (second["model"], (second["outcome"] == "accepted")) == (LARGE, True)
    check_pt(first["pt"], pts[SMALL])
    check_pt(second["pt"], pts[LARGE])
    assert response.additional_kwargs[ROUTING_KEY]["attempts"][0]["reason"] == f"P(T) {pts[SMALL]:.3f} < {tau:g}"
    completion = llm.complete(QUESTION)
    assert completion.text == li_direct[LARGE]  # a chat model: complete sends the prompt as the user turn
    attempts = completion.additional_kwargs[RECORD_KEY]["attempts"]
    assert [a["model"] for a in attempts] == [SMALL, LARGE]
    check_pt(attempts[0]["pt"], pts[SMALL])
    check_pt(attempts[1]["pt"], pts[LARGE])


def test_llamaindex_stream_emits_only_the_accepted_rung(li_llms, li_direct, backend_pt):
    reduce, tau, pts = between(backend_pt, small_above=False)
    llm = DifficultyRouterLLM(llms=li_llms, cascade=policy(tau, reduce=reduce))
    chunks = list(llm.stream_chat(MESSAGES))
    direct = list(li_llms[LARGE].stream_chat(MESSAGES))
    assert [c.delta for c in chunks] == [c.delta for c in direct]
    assert "".join(c.delta or "" for c in chunks) == li_direct[LARGE]
    assert chunks[-1].message.content == li_direct[LARGE]
    for chunk in chunks:
        record = chunk.additional_kwargs[RECORD_KEY]
        assert [a["model"] for a in record["attempts"]] == [SMALL, LARGE]
    first, second = chunks[0].additional_kwargs[RECORD_KEY]["attempts"]
    check_pt(first["pt"], pts[SMALL])  # P(T) from the streamed chunks
    check_pt(second["pt"], pts[LARGE])


def test_llamaindex_async(li_llms, li_direct):
    llm = DifficultyRouterLLM(llms=li_llms, cascade=policy(1.0))

    async def go():
        response = await llm.achat(MESSAGES)
        chunks = [c async for c in await llm.astream_chat(MESSAGES)]
        completion = [c async for c in await llm.astream_complete(QUESTION)]
        return response, chunks, completion

    response, chunks, completion = asyncio.run(go())
    assert response.message.content == li_direct[LARGE]
    assert "".join(c.delta or "" for c in chunks) == li_direct[LARGE]
    assert completion[-1].text == li_direct[LARGE]
    assert [a["model"] for a in completion[-1].additional_kwargs[RECORD_KEY]["attempts"]] == [SMALL, LARGE]


def test_llamaindex_missing_logprobs(llama_backends, li_llms, li_direct):
    llms = {SMALL: openai_like(llama_backends[SMALL], SMALL, logprobs=False), LARGE: li_llms[LARGE]}
    with pytest.raises(MissingLogprobsError):
        DifficultyRouterLLM(llms=llms, cascade=policy(0.0)).chat(MESSAGES)
    response = DifficultyRouterLLM(llms=llms, cascade=policy(0.0, on_missing_logprobs="escalate")).chat(MESSAGES)
    assert response.message.content == li_direct[LARGE]
    first, _ = response.additional_kwargs[RECORD_KEY]["attempts"]
    assert first["pt"] is None and first["reason"] == "no logprobs: escalating"


def test_llamaindex_validation_and_pik(li_llms, li_direct):
    with pytest.raises(ValueError, match=r"ladder names \['medium'\].*not among the configured llms"):
        DifficultyRouterLLM(llms=li_llms, cascade=CascadePolicy(ladder=["medium", LARGE]))
    with pytest.raises(ValueError, match="needs a router, a cascade policy, or both"):
        DifficultyRouterLLM(llms=li_llms)
    llm = DifficultyRouterLLM(
        llms=li_llms,
        cascade=policy(signals=("pik",), pik_threshold=0.5),
        pik_scorers={SMALL: lambda conversation: 0.1 if "France" in conversation[-1]["content"] else 1.0},
    )
    response = llm.chat(MESSAGES)
    first, second = response.additional_kwargs[RECORD_KEY]["attempts"]
    assert first["pik"] == 0.1 and first["outcome"] != "accepted" and second["model"] == LARGE
    assert response.message.content == li_direct[LARGE]
    with pytest.raises(NotImplementedError, match="tool calls need a router"):
        llm.chat_with_tools([], user_msg=QUESTION)


# --------------------------------------------------------------------------------------
# A rung that fails: its port refuses connections (a real outage, not a fake model)
# --------------------------------------------------------------------------------------
def test_langchain_cascade_escalates_past_a_failing_rung(lc_models, lc_direct):
    models = {SMALL: chat_openai(dead_url(), SMALL), LARGE: lc_models[LARGE]}
    message = ChatDifficultyRouter(models=models, cascade=policy(0.0)).invoke(QUESTION)
    assert message.text == lc_direct[LARGE]
    first, second = message.response_metadata[RECORD_KEY]["attempts"]
    assert (
        first["model"] == SMALL
        and first["outcome"] != "accepted"
        and first["error"].endswith("ConnectionError: Connection error.")
    )  # openai.APIConnectionError
    assert second["model"] == LARGE and (second["outcome"] == "accepted")
    streamed = list(ChatDifficultyRouter(models=models, cascade=policy(0.0)).stream(QUESTION))
    assert "".join(c.text for c in streamed) == lc_direct[LARGE]


def test_langchain_cascade_rung_error_outside_escalate_on_propagates(lc_models):
    import openai

    models = {SMALL: chat_openai(dead_url(), SMALL), LARGE: lc_models[LARGE]}
    chat = ChatDifficultyRouter(models=models, cascade=policy(0.0), escalate_on=TimeoutError)
    with pytest.raises(openai.APIConnectionError):
        chat.invoke(QUESTION)
    everything_down = ChatDifficultyRouter(
        models={SMALL: chat_openai(dead_url(), SMALL), LARGE: chat_openai(dead_url(), LARGE)}, cascade=policy(0.0)
    )
    with pytest.raises(openai.APIConnectionError):
        asyncio.run(everything_down.ainvoke(QUESTION))


def test_llamaindex_cascade_escalates_past_a_failing_rung(li_llms, li_direct):
    llms = {SMALL: openai_like(dead_url(), SMALL), LARGE: li_llms[LARGE]}
    response = DifficultyRouterLLM(llms=llms, cascade=policy(0.0)).chat(MESSAGES)
    assert response.message.content == li_direct[LARGE]
    first, second = response.additional_kwargs[RECORD_KEY]["attempts"]
    assert (
        first["model"] == SMALL
        and first["outcome"] != "accepted"
        and first["error"].endswith("ConnectionError: Connection error.")
    )  # openai.APIConnectionError
    assert second["model"] == LARGE and (second["outcome"] == "accepted")
    chunks = list(DifficultyRouterLLM(llms=llms, cascade=policy(0.0)).stream_chat(MESSAGES))
    assert "".join(c.delta or "" for c in chunks) == li_direct[LARGE]


def test_llamaindex_cascade_without_escalation_raises_the_rung_error(li_llms):
    import openai

    llms = {SMALL: openai_like(dead_url(), SMALL), LARGE: li_llms[LARGE]}
    with pytest.raises(openai.APIConnectionError):
        DifficultyRouterLLM(llms=llms, cascade=policy(0.0), escalate=False).chat(MESSAGES)
