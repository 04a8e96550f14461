"""One routed call, whatever the front end: which model to try next, when to give up, what happened.

Every front end (the LangChain chat model, the LlamaIndex LLM, the OpenAI-compatible server
and the core :class:`~difficulty_router.calling.cascade.Cascade`) does the same thing per call: walk
a ladder of models, call one, and either accept its answer or move on. Plain routing is the
ladder ``[decision.model, *decision.fallbacks]`` whose rungs are accepted unless they fail; a
cascade adds a confidence verdict per rung (:class:`~difficulty_router.calling.cascade.CascadeRun`).
That walk lives here once:

- :class:`Binding` checks, once, that a router and/or cascade fit the models given to serve them
  (pool names, ladder, P(IK) scorers, tool capability) and starts a :class:`RoutedCall` per call;
- :class:`RoutedCall` is the state machine: the one escalation rule, retries with backoff, and
  the per-attempt record (model, outcome, reason, tokens, cost, latency) in one schema;
- :func:`run_sync` / :func:`run_async` drive it, and :func:`stream_sync` / :func:`stream_async`
  open streams in its two modes (commit on the first chunk, or buffer until accepted).

Front ends keep only framework conversion, calling a model, and their tracing hooks (:class:`Hooks`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from difficulty_router.calling.cascade import Attempt, CascadePolicy, CascadeRun, hybrid_start, pool_cost_fn
from difficulty_router.calling.confidence import MissingLogprobsError
from difficulty_router.core.errors import is_transient_error

RECORD_KEY = "difficulty_router"
"""Where every front end puts :meth:`RoutedCall.record` on what it returns."""

CANNOT_CALL_TOOLS = "cannot call tools"


def escalation_rule(escalate_on: Any = None) -> Callable[[BaseException], bool]:
    """The test "should this error move the call on to the next model?".

    ``None``: :func:`~difficulty_router.core.errors.is_transient_error` (outages, rate limits, timeouts,
    server errors); ``False``: never; an exception type or tuple of types: ``isinstance``; a
    callable: a predicate on the exception. A bug in user code (a TypeError, a tool raising) is
    not transient, so by default it reaches the caller instead of running again on a pricier model.
    """
    if escalate_on is None:
        return is_transient_error
    if escalate_on is False:
        return lambda exc: False
    if isinstance(escalate_on, type) and issubclass(escalate_on, BaseException):
        return lambda exc: isinstance(exc, escalate_on)
    if (
        isinstance(escalate_on, tuple)
        and escalate_on
        and all(isinstance(t, type) and issubclass(t, BaseException) for t in escalate_on)
    ):
        return lambda exc: isinstance(exc, escalate_on)
    if callable(escalate_on) and not isinstance(escalate_on, type):
        return lambda exc: bool(escalate_on(exc))
    raise TypeError(
        f"escalate_on must be None, False, an exception type, a tuple of them, or a predicate; got {escalate_on!r}"
    )


@dataclass(frozen=True)
class Retry:
    """Extra tries of the same model on an escalating error before moving on, with exponential backoff."""

    max_retries: int = 0
    backoff: float = 0.0
    max_backoff: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not self.backoff >= 0 or not self.max_backoff >= 0:
            raise ValueError(f"retry backoff must be >= 0 seconds, got {self.backoff!r} / {self.max_backoff!r}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before the ``retry``-th retry (1-based) of a model."""
        return 0.0 if retry <= 0 else min(self.max_backoff, self.backoff * 2 ** (retry - 1))


@dataclass
class Reply:
    """One model's answer in the core's terms; ``value`` is the front end's own object, untouched."""

    value: Any
    text: str = ""
    tokens: list[str] | None = None
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pik: float | None = None  # a local rung's own P(IK), when its generation computed one
    deferred: bool = False  # a stream committed at its first chunk: the attempt ends when the stream does


class Hooks:
    """Tracing callbacks of a front end (LangChain child runs, LlamaIndex events, server metrics).

    ``start`` returns a handle passed back to ``end`` / ``error``; ``error`` gets the attempt the
    call recorded, or None when the error is the caller's (it propagates, no escalation). The
    async driver awaits the ``a*`` forms, which default to the sync ones.
    """

    def start(self, call: RoutedCall, model: str) -> Any:
        return None

    def end(self, call: RoutedCall, handle: Any, attempt: Attempt, reply: Reply) -> None:
        return None

    def error(self, call: RoutedCall, handle: Any, attempt: Attempt | None, exc: BaseException) -> None:
        return None

    async def astart(self, call: RoutedCall, model: str) -> Any:
        return self.start(call, model)

    async def aend(self, call: RoutedCall, handle: Any, attempt: Attempt, reply: Reply) -> None:
        self.end(call, handle, attempt, reply)

    async def aerror(self, call: RoutedCall, handle: Any, attempt: Attempt | None, exc: BaseException) -> None:
        self.error(call, handle, attempt, exc)


class RoutedCall:
    """One call's walk up its ladder. Front ends call :attr:`next_model` and report what came back.

    Plain routing (``decision`` without ``cascade``): rungs are ``[decision.model,
    *decision.fallbacks]`` (just ``ladder`` when there is no decision, e.g. a backend named
    directly); the first answer is accepted. Cascade: the policy judges each answer and a
    rejected one moves the call up the ladder; with a decision and ``skip_threshold`` it starts
    at the first rung the router expects to succeed (hybrid mode).

    An exception moves the call on only if ``rule`` says so (and never a
    :class:`MissingLogprobsError`, which is a configuration problem); it first retries the same
    model per ``retry``. When no model is left (or ``fallbacks=False``: only the first model may
    answer) the last exception propagates, with a note listing every attempt.
    """

    def __init__(
        self,
        *,
        decision: Any = None,
        ladder: Sequence[str] | None = None,
        cascade: CascadePolicy | None = None,
        skip_threshold: float | None = None,
        pik: Callable[[str], float | None] | None = None,
        rule: Callable[[BaseException], bool] | None = None,
        retry: Retry | None = None,
        cost_fn: Callable[[str, int, int], float] | None = None,
        fallbacks: bool = True,
        on_served: Callable[[str], None] | None = None,
        shadow: dict[str, Any] | None = None,
        on_done: Callable[[RoutedCall], None] | None = None,
        query_id: str | None = None,
    ) -> None:
        self.decision = decision
        self.query_id = query_id  # names this call in the decision log, so a later grade can be joined to it
        self.on_served = on_served  # told the model that answered (a session sticks to it)
        self.on_done = on_done  # told once the call is over (the decision log), by the drivers' finish()
        self.shadow = shadow  # shadow mode: {"default", "would_be", "sampled", "alternative"}
        self.alternative_reply: Reply | None = None  # the sampled alternative's answer, in shadow mode
        self.sample_inline = True  # the drivers ask the sampled alternative (the server does it after responding)
        self._finished = False
        self.fallbacks = fallbacks
        self.rule = rule or is_transient_error
        self.retry = retry or Retry()
        self.cost_fn = cost_fn
        self._pik = pik
        self._cascade: CascadeRun | None = None
        if cascade is not None:
            start = None
            if decision is not None and skip_threshold is not None:
                start = hybrid_start(cascade, decision.probabilities, skip_threshold)
            self._cascade = CascadeRun(cascade, start=start, decision=decision, cost_fn=cost_fn)
            self.mode = "cascade"
            self.ladder = list(cascade.ladder)
            self._index = cascade.rung(self._cascade.start)
        elif shadow is not None:
            if decision is None:
                raise ValueError("shadow mode needs the router's decision to record")
            self.ladder, self.mode = [shadow["default"]], "shadow"
            self._index = 0
        else:
            if decision is not None:
                self.ladder, self.mode = [decision.model, *decision.fallbacks][: None if fallbacks else 1], "route"
            elif ladder:
                self.ladder, self.mode = list(ladder), "direct"
            else:
                raise ValueError("a routed call needs a decision, a cascade or a ladder of models")
            self._index = 0
        self.start = self.ladder[self._index]
        self.attempts: list[Attempt] = []
        self.errors: list[BaseException] = []
        self.reply: Reply | None = None
        self.served: Attempt | None = None
        self.exhausted = False
        self.open_handle: Any = None  # the served attempt's hook handle while its stream is still open
        self._retries = 0

    # -- where the call stands ---------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.served is not None

    @property
    def next_model(self) -> str | None:
        if self.done or self.exhausted:
            return None
        return self.ladder[self._index]

    @property
    def buffered(self) -> bool:
        """Streams must be read whole before the verdict (cascade) rather than committed at the first chunk."""
        return self._cascade is not None

    @property
    def delay(self) -> float:
        """Backoff before the next attempt (non-zero only when it retries the same model)."""
        return self.retry.delay(self._retries)

    def pik_for(self, model: str) -> float | None:
        return None if self._pik is None else self._pik(model)

    # -- what came back ----------------------------------------------------------------
    def accept(self, model: str, reply: Reply, latency_s: float = 0.0, *, pik: float | None = None) -> Attempt:
        """The model answered: accept it (routing) or let the cascade policy judge it."""
        self._expect(model)
        if self._cascade is not None:
            attempt = self._cascade.record(
                model,
                reply.text,
                tokens=reply.tokens,
                logprobs=reply.logprobs,
                pik=pik,
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=reply.completion_tokens,
            )
        else:
            cost = self.cost_fn(model, reply.prompt_tokens, reply.completion_tokens) if self.cost_fn else 0.0
            attempt = Attempt(
                model,
                reply.text,
                accepted=True,
                reason="answered",
                prompt_tokens=int(reply.prompt_tokens),
                completion_tokens=int(reply.completion_tokens),
                cost=float(cost),
            )
        attempt.latency_ms = 1000 * latency_s
        self.attempts.append(attempt)
        self._retries = 0
        if attempt.accepted:
            self.served, self.reply = attempt, reply
            if self.on_served is not None:
                self.on_served(model)
        else:
            self._index += 1
        return attempt

    def fail(self, model: str, exc: BaseException, latency_s: float = 0.0) -> Attempt | None:
        """The model raised. Returns the recorded attempt when the call goes on (check
        :attr:`exhausted`: nothing left to try), or None when the error is the caller's."""
        self._expect(model)
        if isinstance(exc, MissingLogprobsError) or not self.rule(exc):
            return None
        attempt = Attempt(
            model,
            "",
            accepted=False,
            reason=f"failed: {type(exc).__name__}",
            error=f"{type(exc).__name__}: {exc}",
            latency_ms=1000 * latency_s,
        )
        self.attempts.append(attempt)
        self.errors.append(exc)
        if self._retries < self.retry.max_retries:
            self._retries += 1
            attempt.reason += ", retrying"
            return attempt
        self._retries = 0
        if self._index + 1 >= len(self.ladder) or not self.fallbacks:
            self.exhausted = True
            tried = "; ".join(f"{a.model}: {a.error or a.reason}" for a in self.attempts)
            exc.add_note(f"difficulty_router: every eligible model failed ({len(self.attempts)} attempts: {tried})")
            return attempt
        if self._cascade is not None:
            self._cascade.record_failure(model, exc)
        self._index += 1
        return attempt

    def _expect(self, model: str) -> None:
        if model != self.next_model:
            raise ValueError(f"expected an answer from {self.next_model!r}, got one from {model!r}")

    # -- the record ----------------------------------------------------------------------
    @property
    def usage(self) -> dict[str, int]:
        """Tokens of every attempt, rejected cascade rungs included."""
        prompt = sum(a.prompt_tokens for a in self.attempts)
        completion = sum(a.completion_tokens for a in self.attempts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def record(self) -> dict[str, Any]:
        """The one decision record every front end attaches under ``difficulty_router``."""
        served = self.served.model if self.served is not None else None
        return {
            "mode": self.mode,
            "query_id": self.query_id,
            "decision": self.decision.to_dict() if self.decision is not None else None,
            "chosen": self.start,
            "served_by": served,
            "escalated": served is not None and served != self.start,
            "attempts": [attempt_record(a) for a in self.attempts],
            "usage": self.usage,
            "cost": float(sum(a.cost for a in self.attempts)),
            "session": getattr(self.decision, "session", None),
            "shadow": self.shadow_record(),
        }

    def shadow_record(self) -> dict[str, Any] | None:
        """Shadow mode's part of the record: the router's would-be choice and, when this call was
        sampled, the alternative model's answer (a label to compare with the default's)."""
        if self.shadow is None:
            return None
        out = dict(self.shadow)
        alt = self.alternative_reply
        if alt is not None:
            out["alternative_answer"] = {
                "text": alt.text,
                "prompt_tokens": alt.prompt_tokens,
                "completion_tokens": alt.completion_tokens,
            }
        return out

    @property
    def sample_alternative(self) -> str | None:
        """The model a shadow-mode call should also be sent to (to collect a label), else None."""
        if self.shadow is None or not self.shadow.get("sampled") or self.alternative_reply is not None:
            return None
        return self.shadow.get("alternative")

    def finish(self) -> None:
        """The call is over: tell ``on_done`` (once)."""
        if self._finished:
            return
        self._finished = True
        if self.on_done is not None:
            self.on_done(self)


def attempt_record(attempt: Attempt) -> dict[str, Any]:
    """One attempt in the record's schema."""
    outcome = "accepted" if attempt.accepted else ("failed" if attempt.error is not None else "rejected")
    return {
        "model": attempt.model,
        "outcome": outcome,
        "reason": attempt.reason,
        "error": attempt.error,
        "text": attempt.text,
        "pt": attempt.pt,
        "pik": attempt.pik,
        "prompt_tokens": attempt.prompt_tokens,
        "completion_tokens": attempt.completion_tokens,
        "cost": attempt.cost,
        "latency_ms": round(attempt.latency_ms, 3),
    }


# -- drivers: one loop each for sync and async, the same state machine ---------------------
def run_sync(call: RoutedCall, invoke: Callable[[str], Reply], hooks: Hooks | None = None) -> Reply:
    """Call ``invoke(model)`` up the ladder until an answer is accepted; returns that reply."""
    hooks = hooks or Hooks()
    while not call.done:
        model = call.next_model
        assert model is not None
        if call.delay:
            time.sleep(call.delay)
        handle = hooks.start(call, model)
        began = time.perf_counter()
        try:
            pik = call.pik_for(model)
            reply = invoke(model)
            attempt = call.accept(model, reply, time.perf_counter() - began, pik=_first(reply.pik, pik))
        except Exception as exc:
            recorded = call.fail(model, exc, time.perf_counter() - began)
            hooks.error(call, handle, recorded, exc)
            if recorded is None or call.exhausted:
                call.finish()
                raise
            continue
        if reply.deferred:
            call.open_handle = handle
        else:
            hooks.end(call, handle, attempt, reply)
    assert call.reply is not None
    alternative = call.sample_alternative if call.sample_inline else None
    if alternative is not None and not call.reply.deferred:
        try:
            call.alternative_reply = invoke(alternative)
        except Exception as exc:  # noqa: BLE001 - a label we failed to collect never fails the served call
            call.shadow = {**(call.shadow or {}), "alternative_error": f"{type(exc).__name__}: {exc}"}
    call.finish()
    return call.reply


async def run_async(call: RoutedCall, invoke: Callable[[str], Awaitable[Reply]], hooks: Hooks | None = None) -> Reply:
    """The async twin of :func:`run_sync`; P(IK) scorers (a forward pass) run off the event loop."""
    hooks = hooks or Hooks()
    while not call.done:
        model = call.next_model
        assert model is not None
        if call.delay:
            await asyncio.sleep(call.delay)
        handle = await hooks.astart(call, model)
        began = time.perf_counter()
        try:
            pik = await asyncio.to_thread(call.pik_for, model) if call._pik is not None else None
            reply = await invoke(model)
            attempt = call.accept(model, reply, time.perf_counter() - began, pik=_first(reply.pik, pik))
        except Exception as exc:
            recorded = call.fail(model, exc, time.perf_counter() - began)
            await hooks.aerror(call, handle, recorded, exc)
            if recorded is None or call.exhausted:
                call.finish()
                raise
            continue
        if reply.deferred:
            call.open_handle = handle
        else:
            await hooks.aend(call, handle, attempt, reply)
    assert call.reply is not None
    alternative = call.sample_alternative if call.sample_inline else None
    if alternative is not None and not call.reply.deferred:
        try:
            call.alternative_reply = await invoke(alternative)
        except Exception as exc:  # noqa: BLE001 - a label we failed to collect never fails the served call
            call.shadow = {**(call.shadow or {}), "alternative_error": f"{type(exc).__name__}: {exc}"}
    call.finish()
    return call.reply


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


@dataclass
class OpenedStream:
    """An accepted model's stream: ``head`` (chunks already read) then ``tail`` (the rest, unread)."""

    head: list[Any]
    tail: Any = field(default_factory=lambda: iter(()))


_END = object()


def stream_sync(
    call: RoutedCall,
    open_stream: Callable[[str], Iterable[Any]],
    signals: Callable[[list[Any]], Reply],
    hooks: Hooks | None = None,
) -> OpenedStream:
    """Open streams up the ladder until one is accepted.

    Commit mode (routing): a model is accepted at its first chunk; errors before it escalate,
    errors after it are the caller's (text already shown cannot be taken back). Buffer mode
    (cascade): each rung's whole stream is read and judged (``signals`` turns the chunks into a
    :class:`Reply`); a rejected rung's chunks never reach the caller.
    """

    def invoke(model: str) -> Reply:
        chunks = iter(open_stream(model))
        if call.buffered:
            head = list(chunks)
            reply = signals(head)
            reply.value = OpenedStream(head)
            return reply
        first = next(chunks, _END)
        return Reply(value=OpenedStream([] if first is _END else [first], chunks), deferred=True)

    hooks = hooks or Hooks()
    opened = run_sync(call, invoke, hooks).value
    if not call.buffered:
        opened.tail = _watched(opened.tail, call, hooks)
    return opened


def _watched(tail: Iterator[Any], call: RoutedCall, hooks: Hooks) -> Iterator[Any]:
    """The rest of a committed stream; the attempt's hooks end (or fail) when the stream does."""
    assert call.served is not None and call.reply is not None
    try:
        yield from tail
    except Exception as exc:
        hooks.error(call, call.open_handle, None, exc)
        raise
    hooks.end(call, call.open_handle, call.served, call.reply)


async def stream_async(
    call: RoutedCall,
    open_stream: Callable[[str], Any],
    signals: Callable[[list[Any]], Reply],
    hooks: Hooks | None = None,
) -> OpenedStream:
    """The async twin of :func:`stream_sync`; ``open_stream(model)`` awaits to an async iterator
    (or is one)."""

    async def invoke(model: str) -> Reply:
        opened = open_stream(model)
        if asyncio.iscoroutine(opened) or isinstance(opened, asyncio.Future):
            opened = await opened
        chunks = opened.__aiter__()
        if call.buffered:
            head = [chunk async for chunk in chunks]
            reply = signals(head)
            reply.value = OpenedStream(head, _empty_async())
            return reply
        first = await anext(chunks, _END)
        return Reply(value=OpenedStream([] if first is _END else [first], chunks), deferred=True)

    hooks = hooks or Hooks()
    opened = (await run_async(call, invoke, hooks)).value
    if not call.buffered:
        opened.tail = _awatched(opened.tail, call, hooks)
    return opened


async def _awatched(tail: AsyncIterator[Any], call: RoutedCall, hooks: Hooks) -> AsyncIterator[Any]:
    assert call.served is not None and call.reply is not None
    try:
        async for chunk in tail:
            yield chunk
    except Exception as exc:
        await hooks.aerror(call, call.open_handle, None, exc)
        raise
    await hooks.aend(call, call.open_handle, call.served, call.reply)


async def _empty_async() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover


# -- binding: checked once per front end -----------------------------------------------------
class Binding:
    """A router and/or a cascade bound to the models that serve them, checked once.

    ``models``: the names the front end can call (its pool models or backends). With a router
    they must be exactly the router's pool; a cascade's ladder must be among them; P(IK)
    scorers must name ladder rungs and cover every rung below the top when the policy uses
    P(IK). ``escalate_on`` / ``retry`` set the escalation rule for every call; ``fallbacks=False``
    keeps each call on its first model (its errors, recorded, reach the caller).

    ``sessions``: a :class:`~difficulty_router.routing.sessions.Sessions`; :meth:`decide` with a ``session``
    key then returns that session's decision for the turn, and the model that serves becomes the
    session's. ``shadow``: a model name to serve every routed call with (shadow mode): the router
    still decides, the record (and ``decision_log``, a :class:`~difficulty_router.DecisionLog`)
    keeps its would-be choice; a ``shadow_sample`` share of calls is also sent to the would-be
    model (sync/async calls, not streams), its answer recorded as a label.
    """

    def __init__(
        self,
        models: Iterable[str],
        *,
        router: Any = None,
        cascade: CascadePolicy | None = None,
        pik_scorers: Mapping[str, Callable[[Any], float]] | None = None,
        skip_threshold: float | None = None,
        escalate_on: Any = None,
        retry: Retry | None = None,
        fallbacks: bool = True,
        what: str = "models",
        sessions: Any = None,
        shadow: str | None = None,
        shadow_sample: float = 0.0,
        decision_log: Any = None,
        rng: Any = None,
    ) -> None:
        self.models = list(models)
        self.what = what
        if router is None and cascade is None:
            raise ValueError("routing needs a router, a cascade policy, or both")
        if router is not None:
            if not callable(getattr(router, "route", None)) or not isinstance(getattr(router, "models", None), list):
                raise TypeError(
                    f"router must be a difficulty_router.DifficultyRouter (with .route and .models), "
                    f"got {type(router).__name__}"
                )
            check_pool(router.models, self.models, what)
        self.router = router
        self.cascade = cascade
        self.pik_scorers = dict(pik_scorers or {})
        self.skip_threshold = skip_threshold
        self._check_cascade()
        self.rule = escalation_rule(escalate_on)
        self.fallbacks = fallbacks
        self.retry = retry or Retry()
        pool = getattr(router, "pool", None)
        self.cost_fn = pool_cost_fn(pool) if pool is not None else None
        self.sessions = self._check_sessions(sessions)
        self._check_shadow(shadow, shadow_sample, decision_log)
        self.shadow, self.shadow_sample, self.decision_log = shadow, float(shadow_sample), decision_log
        import random

        self.rng = rng if rng is not None else random.Random()

    def _check_shadow(self, shadow: str | None, sample: float, log: Any) -> None:
        if log is not None:
            from difficulty_router.routing.decision_log import DecisionLog

            if not isinstance(log, DecisionLog):
                raise TypeError(f"decision_log must be a difficulty_router.DecisionLog, got {type(log).__name__}")
        if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 <= sample <= 1:
            raise ValueError(f"shadow_sample must be a share in [0, 1], got {sample!r}")
        if shadow is None:
            if sample:
                raise ValueError("shadow_sample= only applies with shadow= (the default model to serve)")
            return
        if shadow not in self.models:
            raise ValueError(f"shadow={shadow!r} is not among the configured {self.what} {self.models}")
        if self.router is None or self.cascade is not None:
            raise ValueError("shadow mode routes (to log the choice) and serves the default: give a router, no cascade")

    def _check_sessions(self, sessions: Any) -> Any:
        if sessions is None:
            return None
        from difficulty_router.routing.sessions import Sessions

        if not isinstance(sessions, Sessions):
            raise TypeError(
                f"sessions must be a difficulty_router.routing.sessions.Sessions, got {type(sessions).__name__}"
            )
        if self.router is None:
            raise ValueError("sessions= needs a router: a session policy works on routing decisions")
        sessions.bind(self.router)
        return sessions

    def _check_cascade(self) -> None:
        if self.cascade is None:
            if self.pik_scorers or self.skip_threshold is not None:
                raise ValueError("pik_scorers= and skip_threshold= only apply with cascade=")
            return
        if not isinstance(self.cascade, CascadePolicy):
            raise TypeError(
                f"cascade must be a difficulty_router.calling.cascade.CascadePolicy, got {type(self.cascade).__name__}"
            )
        ladder = list(self.cascade.ladder)
        missing = [m for m in ladder if m not in self.models]
        if missing:
            raise ValueError(
                f"the cascade ladder names {missing}, which are not among the configured {self.what} "
                f"{self.models}; give {self.what}= a model for every rung"
            )
        unknown = sorted(set(self.pik_scorers) - set(ladder))
        if unknown:
            raise ValueError(f"pik_scorers= names {unknown}, which are not on the cascade ladder {ladder}")
        for name, scorer in self.pik_scorers.items():
            if not callable(scorer):
                raise TypeError(f"pik_scorers[{name!r}] must be callable(conversation) -> float")
        if self.cascade.needs_pik:
            lacking = [m for m in ladder[:-1] if m not in self.pik_scorers]
            if lacking:
                raise ValueError(f"the cascade policy uses P(IK) but rungs {lacking} have no pik_scorers= entry")
        if self.skip_threshold is not None:
            if self.router is None:
                raise ValueError("skip_threshold= (hybrid mode) needs a router to read the start rung from")
            if isinstance(self.skip_threshold, bool) or not 0 <= self.skip_threshold <= 1:
                raise ValueError(f"skip_threshold must be in [0, 1], got {self.skip_threshold!r}")

    @property
    def routes(self) -> bool:
        """Does a call need a routing decision (a router alone, or the hybrid cascade)?"""
        return self.router is not None and (self.cascade is None or self.skip_threshold is not None)

    def tool_exclusions(self, can_call_tools: Mapping[str, bool]) -> dict[str, str]:
        """Models to skip for a call with tools; refuses when none of them can call tools."""
        excluded = {name: CANNOT_CALL_TOOLS for name in self.models if not can_call_tools.get(name, False)}
        if len(excluded) == len(self.models):
            raise ValueError(f"none of the {self.what} {self.models} can call tools; give at least one that can")
        return excluded

    def decide(
        self,
        query: Any,
        exclude: Mapping[str, str] | None = None,
        *,
        session: str | None = None,
        context_tokens: int = 0,
    ) -> Any:
        """The router's decision for ``query``; with ``sessions=`` and a ``session`` key, the decision
        that session's policy serves for this turn (``context_tokens``: the prompt's tokens)."""
        if self.router is None:
            raise NotImplementedError("this call needs a router: the cascade alone cannot route it")
        decision = self.router.route(query, exclude=dict(exclude) if exclude else None)
        if self.sessions is not None and session is not None:
            decision = self.sessions.apply(session, decision, context_tokens=context_tokens)
        return decision

    def decide_batch(self, queries: Sequence[Any], exclude: Mapping[str, str] | None = None) -> list[Any]:
        return self.router.route_batch(list(queries), exclude=dict(exclude) if exclude else None, progress=False)

    def start(self, decision: Any = None, *, query: Any = None, cascade: bool = True) -> RoutedCall:
        """A call for one query; ``query`` feeds the P(IK) scorers; ``cascade=False`` routes plainly
        (tool calls, which a cascade does not judge)."""
        policy = self.cascade if cascade else None
        pik = None
        if policy is not None and self.pik_scorers:
            scorers = self.pik_scorers

            def pik(model: str) -> float | None:
                scorer = scorers.get(model)
                return None if scorer is None else float(scorer(query))

        on_served = None
        session = getattr(decision, "session", None)
        if self.sessions is not None and session is not None and self.shadow is None:
            sessions, key = self.sessions, session["key"]

            def on_served(model: str) -> None:
                sessions.served(key, model)

        shadow = None
        if self.shadow is not None and decision is not None:
            sampled = decision.model != self.shadow and self.rng.random() < self.shadow_sample
            shadow = {
                "default": self.shadow,
                "would_be": decision.model,
                "sampled": sampled,
                "alternative": decision.model if sampled else None,
            }
        on_done, query_id = None, None
        if self.decision_log is not None and decision is not None:
            log, router = self.decision_log, self.router
            query_id = new_query_id()

            def on_done(call: RoutedCall) -> None:
                served = call.served.model if call.served is not None else None
                log.log_call(
                    query, decision, served_by=served, shadow=call.shadow_record(), query_id=query_id, router=router
                )

        return RoutedCall(
            decision=decision,
            cascade=policy,
            skip_threshold=self.skip_threshold,
            pik=pik,
            rule=self.rule,
            retry=self.retry,
            cost_fn=self.cost_fn,
            fallbacks=self.fallbacks,
            on_served=on_served,
            shadow=shadow,
            on_done=on_done,
            query_id=query_id,
        )


def new_query_id() -> str:
    """A fresh id for one logged call (random, 128 bits): the key ``difficulty-router feedback`` joins grades on."""
    import uuid

    return uuid.uuid4().hex


def check_pool(pool: Sequence[str], models: Sequence[str], what: str = "models") -> None:
    """Every pool model has something to serve it, and nothing else is given."""
    pool = list(pool)
    missing = [m for m in pool if m not in models]
    extra = [m for m in models if m not in pool]
    if missing:
        raise ValueError(f"{what}= has nothing for the pool model(s) {missing}; the router may pick any of {pool}")
    if extra:
        raise ValueError(f"{what}= names {extra}, which are not in the router's pool {pool}")
