"""One routed call's state machine and its record: which model to try next, when to give up, what happened.

A :class:`RoutedCall` owns its walk up a ladder of models (where it stands, the retries of the
model it is on, every attempt) and takes the verdict on each answer as a policy
(:mod:`difficulty_router.calling.verdict`): plain routing accepts the first answer, a cascade
judges each rung. It calls no model itself; the drivers (:mod:`.drivers`, :mod:`.streams`) do,
and report back through :meth:`RoutedCall.accept` and :meth:`RoutedCall.fail`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from difficulty_router.calling.attempt import Attempt, CostFn, Reply, attempt_record
from difficulty_router.calling.cascade_policy import CascadePolicy, hybrid_start
from difficulty_router.calling.confidence import MissingLogprobsError
from difficulty_router.calling.dispatch.holdback import NO_HOLDBACK, StreamHoldback
from difficulty_router.calling.verdict import AcceptAnswer, CascadeVerdict, Verdict
from difficulty_router.core.errors import is_transient_error

RECORD_KEY = "difficulty_router"
"""Where every front end puts :meth:`RoutedCall.record` on what it returns."""


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


def shadow_plan(default: str, decision: Any, sampled: bool) -> dict[str, Any]:
    """Shadow mode's part of a call before it runs: served by ``default``, the router's would-be
    choice kept, and (when ``sampled``) that choice also asked, for a label."""
    return {
        "default": default,
        "would_be": decision.model,
        "sampled": sampled,
        "alternative": decision.model if sampled else None,
    }


class RoutedCall:
    """One call's walk up its ladder. Front ends call :attr:`next_model` and report what came back.

    Plain routing (``decision`` without ``cascade``): rungs are ``[decision.model,
    *decision.fallbacks]`` (just ``ladder`` when there is no decision, e.g. a backend named
    directly); the first answer is accepted. Cascade: the policy judges each answer and a
    rejected one moves the call up the ladder; it starts at ``start`` when given, else, with a
    decision and ``skip_threshold``, at the first rung the router expects to succeed (hybrid mode).

    An exception moves the call on only if ``rule`` says so (and never a
    :class:`MissingLogprobsError`, which is a configuration problem); it first retries the same
    model per ``retry``. When no model is left (or ``fallbacks=False``: only the first model may
    answer) the last exception propagates, with a note listing every attempt. ``holdback``: when a
    routed stream commits to its model (:class:`~.holdback.StreamHoldback`; default: its first chunk).
    """

    def __init__(
        self,
        *,
        decision: Any = None,
        ladder: Sequence[str] | None = None,
        cascade: CascadePolicy | None = None,
        skip_threshold: float | None = None,
        start: str | None = None,
        pik: Callable[[str], float | None] | None = None,
        rule: Callable[[BaseException], bool] | None = None,
        retry: Retry | None = None,
        cost_fn: CostFn | None = None,
        fallbacks: bool = True,
        on_served: Callable[[str], None] | None = None,
        shadow: dict[str, Any] | None = None,
        on_done: Callable[[RoutedCall], None] | None = None,
        query_id: str | None = None,
        holdback: StreamHoldback | None = None,
    ) -> None:
        if holdback is not None and not isinstance(holdback, StreamHoldback):
            raise TypeError(f"holdback must be a difficulty_router.StreamHoldback, got {type(holdback).__name__}")
        self.holdback = holdback or NO_HOLDBACK
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
        self.verdict: Verdict
        if cascade is not None:
            if start is None and decision is not None and skip_threshold is not None:
                start = hybrid_start(cascade, decision.probabilities, skip_threshold)
            self.verdict, self.mode = CascadeVerdict(cascade, cost_fn), "cascade"
            self.ladder = list(cascade.ladder)
            self._index = cascade.rung(start or cascade.ladder[0])
        else:
            if start is not None:
                raise ValueError("start= picks a cascade's first rung; a routed call without a cascade starts first")
            self.verdict, self._index = AcceptAnswer(cost_fn), 0
            if shadow is not None:
                if decision is None:
                    raise ValueError("shadow mode needs the router's decision to record")
                self.ladder, self.mode = [shadow["default"]], "shadow"
            elif decision is not None:
                self.ladder, self.mode = [decision.model, *decision.fallbacks][: None if fallbacks else 1], "route"
            elif ladder:
                self.ladder, self.mode = list(ladder), "direct"
            else:
                raise ValueError("a routed call needs a decision, a cascade or a ladder of models")
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
        return self.verdict.buffered

    @property
    def delay(self) -> float:
        """Backoff before the next attempt (non-zero only when it retries the same model)."""
        return self.retry.delay(self._retries)

    @property
    def scores_pik(self) -> bool:
        """Does this call score P(IK) before each attempt (a forward pass, which async drivers run off the loop)?"""
        return self._pik is not None

    def pik_for(self, model: str) -> float | None:
        return None if self._pik is None else self._pik(model)

    # -- what came back ----------------------------------------------------------------
    def accept(self, model: str, reply: Reply, latency_s: float = 0.0, *, pik: float | None = None) -> Attempt:
        """The model answered: the verdict accepts it or moves the call up the ladder."""
        self._expect(model)
        attempt = self.verdict.judge(model, reply, pik)
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
        self._index += 1
        return attempt

    def move_past(self, attempt: Attempt) -> None:
        """Record a failed ``attempt`` of the current model and go on to the next one, the caller
        having decided the call goes on (:class:`~difficulty_router.calling.cascade.CascadeRun`)."""
        self._expect(attempt.model)
        if self._index + 1 >= len(self.ladder):
            raise ValueError(f"{attempt.model!r} is the last model on the ladder; there is nothing to move on to")
        self.attempts.append(attempt)
        self._retries = 0
        self._index += 1

    def _expect(self, model: str) -> None:
        if model != self.next_model:
            raise ValueError(f"expected an answer from {self.next_model!r}, got one from {model!r}")

    # -- shadow mode's sampled alternative ---------------------------------------------
    @property
    def sample_alternative(self) -> str | None:
        """The model a shadow-mode call should also be sent to (to collect a label), else None."""
        if self.shadow is None or not self.shadow.get("sampled") or self.alternative_reply is not None:
            return None
        return self.shadow.get("alternative")

    def alternative_failed(self, exc: BaseException) -> None:
        """Asking the sampled alternative failed: noted in the record; a label we failed to collect
        never fails the served call."""
        self.shadow = {**(self.shadow or {}), "alternative_error": f"{type(exc).__name__}: {exc}"}

    def log_to(self, log: Any, query: Any, router: Any) -> None:
        """Write this call to a :class:`~difficulty_router.DecisionLog`: the query, the decision, the model
        that served, shadow mode's record and the query id a later grade is joined on."""
        served = self.served.model if self.served is not None else None
        log.log_call(
            query, self.decision, served_by=served, shadow=self.shadow_record(), query_id=self.query_id, router=router
        )

    def finish(self) -> None:
        """The call is over: tell ``on_done`` (once)."""
        if self._finished:
            return
        self._finished = True
        if self.on_done is not None:
            self.on_done(self)

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
