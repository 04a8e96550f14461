"""The routed-call core, once for every front end: escalation, retries, cascade verdicts, both
streaming modes, sync and async drivers, binding checks and the one record schema.

The "models" here are plain Python callables raising real exception types: the dispatch core's
API is exactly "call this model" callbacks, so no framework is needed to exercise it. The
adapters' and server's suites run the same core against real llama.cpp servers.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from difficulty_router.calling import dispatch
from difficulty_router.calling.cascade_policy import CascadePolicy
from difficulty_router.calling.confidence import MissingLogprobsError
from difficulty_router.calling.dispatch import Binding, Reply, Retry, RoutedCall
from difficulty_router.core.errors import is_transient_error
from difficulty_router.routing.decision import RouteDecision

WEAK, MID, STRONG = "weak", "mid", "strong"
RECORD_KEYS = {"mode", "query_id", "decision", "chosen", "served_by", "escalated", "attempts", "usage", "cost", "session",
               "shadow"}
ATTEMPT_KEYS = {"model", "outcome", "reason", "error", "text", "pt", "pik", "prompt_tokens", "completion_tokens",
                "cost", "latency_ms"}


def decision(model=WEAK, fallbacks=(MID, STRONG)):
    probs = {WEAK: 0.4, MID: 0.6, STRONG: 0.9}
    return RouteDecision(model=model, probabilities=probs, difficulty=3.0, difficulty_level=3, expected_cost=1.0,
                         costs={WEAK: 1.0, MID: 2.0, STRONG: 3.0}, policy="threshold", parameter="tau",
                         parameter_value=0.5, fallbacks=tuple(fallbacks))


class Models:
    """Scripted behaviour per model: a list of outcomes consumed call by call (an exception
    instance is raised, a string answered); every call is logged."""

    def __init__(self, **script):
        self.script = {m: list(v) for m, v in script.items()}
        self.calls: list[str] = []

    def __call__(self, model: str) -> Reply:
        self.calls.append(model)
        outcome = self.script[model].pop(0) if len(self.script[model]) > 1 else self.script[model][0]
        if isinstance(outcome, BaseException):
            raise outcome
        return Reply(outcome, outcome, prompt_tokens=10, completion_tokens=len(outcome))

    async def acall(self, model: str) -> Reply:
        await asyncio.sleep(0)
        return self(model)


def drive(call, models, mode):
    if mode == "sync":
        return dispatch.run_sync(call, models)
    return asyncio.run(dispatch.run_async(call, models.acall))


MODES = ["sync", "async"]


@pytest.mark.parametrize("mode", MODES)
def test_plain_routing_accepts_the_first_answer_and_records_it_in_one_schema(mode):
    models = Models(weak=["w"], mid=["m"], strong=["s"])
    call = RoutedCall(decision=decision(), cost_fn=lambda m, p, c: {"weak": 1, "mid": 2, "strong": 3}[m] * (p + c))
    reply = drive(call, models, mode)
    assert reply.value == "w" and models.calls == [WEAK]
    record = call.record()
    assert set(record) == RECORD_KEYS and set(record["attempts"][0]) == ATTEMPT_KEYS
    assert (record["mode"], record["chosen"], record["served_by"], record["escalated"]) == ("route", WEAK, WEAK, False)
    assert record["decision"]["model"] == WEAK and record["attempts"][0]["outcome"] == "accepted"
    assert record["usage"] == {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
    assert record["cost"] == 11.0


@pytest.mark.parametrize("mode", MODES)
def test_transient_errors_escalate_and_other_errors_reach_the_caller(mode):
    models = Models(weak=[TimeoutError("slow")], mid=[ConnectionError("refused")], strong=["s"])
    call = RoutedCall(decision=decision())
    assert drive(call, models, mode).value == "s" and models.calls == [WEAK, MID, STRONG]
    record = call.record()
    assert [(a["model"], a["outcome"]) for a in record["attempts"]] == [(WEAK, "failed"), (MID, "failed"),
                                                                      (STRONG, "accepted")]
    assert record["attempts"][0]["error"] == "TimeoutError: slow" and record["escalated"]

    bug = Models(weak=[TypeError("a bug in user code")], mid=["m"], strong=["s"])
    with pytest.raises(TypeError, match="a bug in user code"):
        drive(RoutedCall(decision=decision()), bug, mode)
    assert bug.calls == [WEAK]  # never re-run on a pricier model


def test_escalation_rule_forms():
    rate_limited = type("RateLimitError", (Exception,), {})
    assert is_transient_error(rate_limited()) and not is_transient_error(ValueError())
    assert is_transient_error(type("Declared", (Exception,), {"transient": True})())
    assert not is_transient_error(type("Refused", (TimeoutError,), {"transient": False})())
    by_type = dispatch.escalation_rule(ValueError)
    assert by_type(ValueError()) and not by_type(TimeoutError())
    by_tuple = dispatch.escalation_rule((KeyError, ValueError))
    assert by_tuple(KeyError()) and not by_tuple(TypeError())
    predicate = dispatch.escalation_rule(lambda e: "503" in str(e))
    assert predicate(RuntimeError("HTTP 503")) and not predicate(RuntimeError("HTTP 429"))
    assert not dispatch.escalation_rule(False)(TimeoutError())
    with pytest.raises(TypeError, match="escalate_on"):
        dispatch.escalation_rule("TimeoutError")


@pytest.mark.parametrize("mode", MODES)
def test_retries_back_off_on_the_same_model_before_escalating(mode, monkeypatch):
    waits = []
    monkeypatch.setattr(dispatch.drivers.time, "sleep", waits.append)

    async def no_wait(seconds):
        waits.append(seconds)
    monkeypatch.setattr(dispatch.drivers.asyncio, "sleep", no_wait)
    models = Models(weak=[TimeoutError("t")], mid=["m"], strong=["s"])
    call = RoutedCall(decision=decision(), retry=Retry(max_retries=2, backoff=0.5))
    assert drive(call, models, mode).value == "m"
    assert models.calls == [WEAK, WEAK, WEAK, MID]
    assert [w for w in waits if w] == [0.5, 1.0]  # exponential, then none when moving on
    assert [a["reason"] for a in call.record()["attempts"]][:3] == ["failed: TimeoutError, retrying"] * 2 + [
        "failed: TimeoutError"]

    recovers = Models(weak=[TimeoutError("t"), "w"], mid=["m"], strong=["s"])
    assert drive(RoutedCall(decision=decision(), retry=Retry(1)), recovers, mode).value == "w"
    assert recovers.calls == [WEAK, WEAK]
    with pytest.raises(ValueError, match="max_retries"):
        Retry(-1)
    assert Retry(5, backoff=1.0, max_backoff=3.0).delay(4) == 3.0


@pytest.mark.parametrize("mode", MODES)
def test_when_every_model_fails_the_last_error_propagates_with_every_attempt(mode):
    models = Models(weak=[TimeoutError("a")], mid=[TimeoutError("b")], strong=[ConnectionError("c")])
    call = RoutedCall(decision=decision())
    with pytest.raises(ConnectionError, match="c") as info:
        drive(call, models, mode)
    assert call.exhausted and call.served is None
    note = info.value.__notes__[-1]
    assert "3 attempts" in note and "weak: TimeoutError: a" in note and "strong: ConnectionError: c" in note


def cascade_policy(**kw):
    return CascadePolicy([WEAK, MID, STRONG], pt_threshold=0.5, **kw)


def logprob_reply(text, p):
    return Reply(text, text, tokens=[text], logprobs=[math.log(p)], prompt_tokens=5, completion_tokens=1)


@pytest.mark.parametrize("mode", MODES)
def test_cascade_judges_each_rung_and_counts_every_rungs_tokens(mode):
    confidence = {WEAK: 0.2, MID: 0.8, STRONG: 0.99}
    calls = []

    def invoke(model):
        calls.append(model)
        return logprob_reply(model[0].upper(), confidence[model])

    async def ainvoke(model):
        return invoke(model)
    call = RoutedCall(cascade=cascade_policy())
    reply = dispatch.run_sync(call, invoke) if mode == "sync" else asyncio.run(dispatch.run_async(call, ainvoke))
    assert reply.text == "M" and calls == [WEAK, MID]
    record = call.record()
    assert record["mode"] == "cascade" and record["decision"] is None
    assert [(a["model"], a["outcome"]) for a in record["attempts"]] == [(WEAK, "rejected"), (MID, "accepted")]
    assert record["attempts"][0]["pt"] == pytest.approx(0.2) and record["attempts"][0]["reason"].startswith("P(T)")
    assert record["usage"]["prompt_tokens"] == 10  # the rejected rung's tokens are counted too

    hybrid = RoutedCall(decision=decision(), cascade=cascade_policy(), skip_threshold=0.55)
    assert hybrid.next_model == MID and hybrid.start == MID  # the first rung the router expects to succeed


def test_missing_logprobs_is_a_configuration_error_not_an_escalation():
    call = RoutedCall(cascade=cascade_policy(), rule=lambda exc: True)  # even a rule that escalates everything
    with pytest.raises(MissingLogprobsError, match="no logprobs"):
        dispatch.run_sync(call, lambda m: Reply("x", "x"))
    escalating = RoutedCall(cascade=cascade_policy(on_missing_logprobs="escalate"))
    dispatch.run_sync(escalating, lambda m: Reply(m, m))
    assert [a.model for a in escalating.attempts] == [WEAK, MID, STRONG] and escalating.served.model == STRONG


def test_pik_scorers_feed_the_cascade_from_the_binding():
    policy = CascadePolicy([WEAK, STRONG], signals=("pik",), pik_threshold=0.5)
    seen = []
    binding = Binding([WEAK, STRONG], cascade=policy, pik_scorers={WEAK: lambda q: seen.append(q) or 0.1})
    call = binding.start(query="hard question")
    dispatch.run_sync(call, lambda m: Reply(m, m))
    assert seen == ["hard question"] and [a.pik for a in call.attempts] == [0.1, None]
    assert call.served.model == STRONG


def chunks(*items):
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item


@pytest.mark.parametrize("mode", MODES)
def test_commit_mode_escalates_before_the_first_chunk_only(mode):
    streams = {WEAK: [TimeoutError("down")], MID: ["a", "b", ConnectionError("broke mid-stream")], STRONG: ["s"]}

    def open_stream(model):
        return chunks(*streams[model])

    async def aopen(model):
        async def gen():
            for c in chunks(*streams[model]):
                yield c
        return gen()
    call = RoutedCall(decision=decision())
    signals = lambda c: Reply(c)  # noqa: E731
    if mode == "sync":
        opened = dispatch.stream_sync(call, open_stream, signals)
        assert opened.head == ["a"] and call.served.model == MID
        with pytest.raises(ConnectionError):  # text already shown cannot be taken back: the caller's error
            list(opened.tail)
    else:
        async def consume():
            opened = await dispatch.stream_async(call, aopen, signals)
            assert opened.head == ["a"] and call.served.model == MID
            return [c async for c in opened.tail]
        with pytest.raises(ConnectionError):
            asyncio.run(consume())
    assert [a.model for a in call.attempts] == [WEAK, MID]

    empty = RoutedCall(decision=decision())
    opened = dispatch.stream_sync(empty, lambda m: iter(()), signals)
    assert opened.head == [] and empty.served.model == WEAK  # an empty stream is still an answer, with a record


@pytest.mark.parametrize("mode", MODES)
def test_buffer_mode_never_releases_a_rejected_rungs_chunks(mode):
    streams = {WEAK: ["w1", "w2"], MID: ["m1", "m2"], STRONG: ["s"]}
    confidence = {WEAK: 0.1, MID: 0.9, STRONG: 1.0}

    def signals(cs):
        model = {"w": WEAK, "m": MID, "s": STRONG}[cs[0][0]]
        return logprob_reply("".join(cs), confidence[model])
    call = RoutedCall(cascade=cascade_policy())
    if mode == "sync":
        opened = dispatch.stream_sync(call, lambda m: iter(streams[m]), signals)
        rest = list(opened.tail)
    else:
        async def aopen(model):
            async def gen():
                for c in streams[model]:
                    yield c
            return gen()

        async def consume():
            opened = await dispatch.stream_async(call, aopen, signals)
            return opened, [c async for c in opened.tail]
        opened, rest = asyncio.run(consume())
    assert opened.head == ["m1", "m2"] and rest == []
    assert [(a.model, a.accepted) for a in call.attempts] == [(WEAK, False), (MID, True)]


class Spy(dispatch.Hooks):
    def __init__(self):
        self.events = []

    def start(self, call, model):
        self.events.append(("start", model))
        return model

    def end(self, call, handle, attempt, reply):
        self.events.append(("end", handle, attempt.accepted))

    def error(self, call, handle, attempt, exc):
        self.events.append(("error", handle, attempt is not None, call.next_model))


def test_hooks_see_every_attempt_and_whether_the_call_goes_on():
    spy = Spy()
    models = Models(weak=[TimeoutError("t")], mid=["m"], strong=["s"])
    dispatch.run_sync(RoutedCall(decision=decision()), models, spy)
    assert spy.events == [("start", WEAK), ("error", WEAK, True, MID), ("start", MID), ("end", MID, True)]
    spy.events.clear()
    with pytest.raises(KeyError):
        dispatch.run_sync(RoutedCall(decision=decision()), Models(weak=[KeyError("bug")], mid=["m"], strong=["s"]),
                          spy)
    assert spy.events == [("start", WEAK), ("error", WEAK, False, WEAK)]  # not recorded: the caller's error


class FakeRouter:
    """Only the attributes Binding checks; routing itself is the router's own suite."""

    models = [WEAK, STRONG]

    def route(self, query, exclude=None):
        return decision(WEAK, (STRONG,))


def test_binding_checks_names_once_for_every_front_end():
    with pytest.raises(ValueError, match=r"has nothing for the pool model\(s\) \['strong'\]"):
        Binding([WEAK], router=FakeRouter())
    with pytest.raises(ValueError, match=r"names \['extra'\], which are not in the router's pool"):
        Binding([WEAK, STRONG, "extra"], router=FakeRouter())
    with pytest.raises(TypeError, match="DifficultyRouter"):
        Binding([WEAK, STRONG], router="my-router")
    with pytest.raises(ValueError, match="needs a router, a cascade policy, or both"):
        Binding([WEAK, STRONG])
    with pytest.raises(ValueError, match=r"ladder names \['mid'\].*not among the configured llms"):
        Binding([WEAK, STRONG], cascade=cascade_policy(), what="llms")
    with pytest.raises(ValueError, match="only apply with cascade"):
        Binding([WEAK, STRONG], router=FakeRouter(), skip_threshold=0.5)
    with pytest.raises(ValueError, match="needs a router"):
        Binding([WEAK, MID, STRONG], cascade=cascade_policy(), skip_threshold=0.5)
    binding = Binding([WEAK, STRONG], router=FakeRouter())
    assert binding.tool_exclusions({WEAK: False, STRONG: True}) == {WEAK: "cannot call tools"}
    with pytest.raises(ValueError, match="none of the models .* can call tools"):
        binding.tool_exclusions({})
    assert binding.routes and not Binding([WEAK, MID, STRONG], cascade=cascade_policy()).routes


def test_a_direct_call_is_a_one_rung_ladder_and_a_wrong_answer_order_is_refused():
    call = RoutedCall(ladder=[STRONG])
    with pytest.raises(ValueError, match="expected an answer from 'strong'"):
        call.accept(WEAK, Reply("x"))
    dispatch.run_sync(call, lambda m: Reply("ok", "ok"))
    assert call.record()["mode"] == "direct" and call.record()["served_by"] == STRONG
    with pytest.raises(ValueError, match="needs a decision, a cascade or a ladder"):
        RoutedCall()


def test_without_fallbacks_the_first_models_error_reaches_the_caller_recorded():
    models = Models(weak=[TimeoutError("down")], mid=["m"], strong=["s"])
    call = RoutedCall(decision=decision(), fallbacks=False)
    with pytest.raises(TimeoutError) as info:
        dispatch.run_sync(call, models)
    assert models.calls == [WEAK] and call.exhausted
    assert "every eligible model failed (1 attempts: weak: TimeoutError: down)" in info.value.__notes__[-1]
    cascade = RoutedCall(cascade=cascade_policy(), fallbacks=False)
    with pytest.raises(TimeoutError):
        dispatch.run_sync(cascade, Models(weak=[TimeoutError("down")], mid=["m"], strong=["s"]))


def test_a_committed_streams_attempt_ends_when_the_stream_does():
    spy = Spy()
    call = RoutedCall(decision=decision())
    opened = dispatch.stream_sync(call, lambda m: iter(["a", "b"]), lambda c: Reply(c), spy)
    assert spy.events == [("start", WEAK)]  # accepted at the first chunk, still open
    assert list(opened.tail) == ["b"]
    assert spy.events == [("start", WEAK), ("end", WEAK, True)]
    broken = RoutedCall(decision=decision())
    spy.events.clear()
    opened = dispatch.stream_sync(broken, lambda m: chunks("a", ConnectionError("cut")), lambda c: Reply(c), spy)
    with pytest.raises(ConnectionError):
        list(opened.tail)
    assert spy.events == [("start", WEAK), ("error", WEAK, False, None)]


# -- stream hold-back: a break before commit escalates unseen -----------------------------------


def opener(streams, mode, opened_log=None):
    """``open_stream`` over scripted chunk lists (an exception instance is raised where it stands)."""

    def open_stream(model):
        if opened_log is not None:
            opened_log.append(model)
        return chunks(*streams[model])

    async def aopen(model):
        if opened_log is not None:
            opened_log.append(model)

        async def gen():
            for c in chunks(*streams[model]):
                await asyncio.sleep(0)
                yield c

        return gen()

    return open_stream if mode == "sync" else aopen


def open_and_read(call, streams, mode, hooks=None):
    """(head, tail as a list or the exception it raised) of a routed stream."""
    if mode == "sync":
        opened = dispatch.stream_sync(call, opener(streams, mode), lambda c: Reply(c), hooks)
        try:
            return opened.head, list(opened.tail)
        except ConnectionError as exc:
            return opened.head, exc

    async def consume():
        opened = await dispatch.stream_async(call, opener(streams, mode), lambda c: Reply(c), hooks)
        try:
            return opened.head, [c async for c in opened.tail]
        except ConnectionError as exc:
            return opened.head, exc

    return asyncio.run(consume())


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_that_breaks_while_held_back_escalates_and_its_chunks_never_show(mode):
    streams = {
        WEAK: ["w1", "w2", ConnectionError("cut after two chunks")],
        MID: ["m1", "m2", "m3", "m4"],
        STRONG: ["s"],
    }
    call = RoutedCall(decision=decision(), holdback=dispatch.StreamHoldback(chunks=3))
    head, tail = open_and_read(call, streams, mode)
    assert (head, tail) == (["m1", "m2", "m3"], ["m4"])  # MID's whole stream, nothing of WEAK's
    assert [(a.model, a.accepted) for a in call.attempts] == [(WEAK, False), (MID, True)]
    record = call.record()
    assert record["escalated"] and record["served_by"] == MID
    assert record["attempts"][0]["error"] == "ConnectionError: cut after two chunks"


@pytest.mark.parametrize("mode", MODES)
def test_a_break_after_commit_is_the_callers_and_off_commits_at_the_first_chunk(mode):
    streams = {WEAK: ["w1", "w2", ConnectionError("cut")], MID: ["m1"], STRONG: ["s"]}
    at_boundary = RoutedCall(decision=decision(), holdback=dispatch.StreamHoldback(chunks=2))
    head, tail = open_and_read(at_boundary, streams, mode)
    assert head == ["w1", "w2"] and isinstance(tail, ConnectionError)  # committed at chunk 2, broke after
    assert [a.model for a in at_boundary.attempts] == [WEAK]
    off = RoutedCall(decision=decision())
    head, tail = open_and_read(off, streams, mode)
    assert head == ["w1"] and isinstance(tail, ConnectionError)  # unchanged: commit at the first chunk
    short = RoutedCall(decision=decision(), holdback=dispatch.StreamHoldback(chunks=10))
    head, tail = open_and_read(short, {**streams, WEAK: ["w1", "w2"]}, mode)
    assert (head, tail) == (["w1", "w2"], [])  # a stream that ends while held back is committed whole
    assert short.served.model == WEAK


def test_the_time_bound_commits_at_the_first_chunk_that_arrives_after_it():
    def slow(*items, gap):
        for i, item in enumerate(items):
            if i:
                time.sleep(gap)
            if isinstance(item, BaseException):
                raise item
            yield item

    streams = {
        WEAK: lambda: slow("w1", "w2", ConnectionError("cut"), gap=0.05),
        MID: lambda: iter(["m1", "m2"]),
        STRONG: lambda: iter(["s"]),
    }
    long = RoutedCall(decision=decision(), holdback=dispatch.StreamHoldback(ms=1000))
    opened = dispatch.stream_sync(long, lambda m: streams[m](), lambda c: Reply(c))
    assert opened.head == ["m1", "m2"] and long.served.model == MID  # broke 0.1 s in: still held, escalated
    short = RoutedCall(decision=decision(), holdback=dispatch.StreamHoldback(ms=20))
    opened = dispatch.stream_sync(short, lambda m: streams[m](), lambda c: Reply(c))
    assert opened.head == ["w1", "w2"] and short.served.model == WEAK  # chunk 2 came 50 ms in: committed
    with pytest.raises(ConnectionError):
        list(opened.tail)


def test_an_abandoned_stream_is_closed():
    closed = []

    def stream(model):
        try:
            yield f"{model}-1"
            raise ConnectionError("cut")
        finally:
            closed.append(model)

    call = RoutedCall(decision=decision(), holdback=dispatch.StreamHoldback(chunks=2))
    with pytest.raises(ConnectionError):
        dispatch.stream_sync(call, stream, lambda c: Reply(c))
    assert closed == [WEAK, MID, STRONG] and call.exhausted


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunks": -1}, "stream hold-back chunks must be an integer >= 0, got -1"),
        ({"chunks": 2.5}, "stream hold-back chunks must be an integer >= 0, got 2.5"),
        ({"chunks": True}, "stream hold-back chunks must be an integer >= 0, got True"),
        ({"ms": -5}, "stream hold-back ms must be a finite number of milliseconds >= 0, got -5"),
        ({"ms": float("nan")}, "stream hold-back ms must be a finite number of milliseconds >= 0, got nan"),
    ],
)
def test_a_bad_holdback_is_refused_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError) as info:
        dispatch.StreamHoldback(**kwargs)
    assert str(info.value) == message
    with pytest.raises(TypeError, match=r"stream_holdback must be a difficulty_router\.StreamHoldback, got int"):
        Binding([WEAK, MID, STRONG], cascade=cascade_policy(), stream_holdback=3)


def test_the_binding_gives_every_call_its_holdback():
    holdback = dispatch.StreamHoldback(chunks=4)
    binding = Binding([WEAK, MID, STRONG], cascade=cascade_policy(), stream_holdback=holdback)
    assert binding.start(cascade=False, decision=decision()).holdback is holdback
    assert Binding([WEAK, MID, STRONG], cascade=cascade_policy()).start().holdback == dispatch.StreamHoldback()


def test_a_dropped_connection_mid_response_escalates_by_default():
    import http.client

    import httpx

    assert is_transient_error(httpx.RemoteProtocolError("peer closed connection without sending complete message"))
    assert is_transient_error(http.client.IncompleteRead(b"partial"))
