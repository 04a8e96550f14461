"""Cascade routing: answer with the cheapest rung, escalate while its confidence is low.

The front end of the cascade in the core: :class:`Cascade` runs queries through a ladder of
generators (local models, OpenAI-compatible endpoints), and :class:`CascadeRun` lets a caller
walk one query up the ladder by hand. Both are a :class:`~difficulty_router.calling.dispatch.RoutedCall`
with the cascade's verdict, the walk every front end shares (the LangChain and LlamaIndex
adapters and the server too), so escalation, accounting and the record of every attempt live
there once. The policy itself, its replay and calibration are
:mod:`difficulty_router.calling.cascade_policy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

from difficulty_router.calling.attempt import Attempt, CostFn, Reply, pool_cost_fn
from difficulty_router.calling.cascade_policy import CascadePolicy
from difficulty_router.calling.dispatch import RoutedCall, run_sync


@dataclass
class CascadeResult:
    model: str
    text: str
    attempts: list[Attempt]
    start: str
    decision: Any = None  # the pre-generation RouteDecision in hybrid mode

    @property
    def escalations(self) -> int:
        return len(self.attempts) - 1

    @property
    def cost(self) -> float:
        return float(sum(a.cost for a in self.attempts))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "text": self.text,
            "start": self.start,
            "escalations": self.escalations,
            "cost": self.cost,
            "attempts": [asdict(a) for a in self.attempts],
            "decision": self.decision.to_dict() if self.decision is not None else None,
        }


class CascadeRun:
    """One query's walk up the ladder by hand; the caller calls the rung it names and records what came back.

    >>> run = CascadeRun(policy)
    >>> while not run.done:
    ...     reply = call(run.next_model)
    ...     run.record(run.next_model, reply.text, tokens=..., logprobs=...)
    >>> run.result()
    """

    def __init__(
        self,
        policy: CascadePolicy,
        *,
        start: str | None = None,
        decision: Any = None,
        cost_fn: CostFn | None = None,
    ) -> None:
        self.policy = policy
        self.decision = decision
        self.cost_fn = cost_fn
        self._call = RoutedCall(cascade=policy, start=start or policy.ladder[0], cost_fn=cost_fn)

    @property
    def start(self) -> str:
        return self._call.start

    @property
    def attempts(self) -> list[Attempt]:
        return self._call.attempts

    @property
    def done(self) -> bool:
        return self._call.done

    @property
    def next_model(self) -> str | None:
        return self._call.next_model

    def record(
        self,
        model: str,
        text: str,
        *,
        tokens: Sequence[str] | None = None,
        logprobs: Sequence[float] | None = None,
        pik: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> Attempt:
        """The rung answered: the policy accepts its answer or the walk moves up."""
        reply = Reply(
            text,
            text,
            list(tokens) if tokens is not None else None,
            list(logprobs) if logprobs is not None else None,
            prompt_tokens,
            completion_tokens,
        )
        return self._call.accept(model, reply, pik=pik)

    def record_failure(self, model: str, error: BaseException) -> Attempt:
        """The rung raised (provider down, timeout): escalate, or re-raise at the top of the ladder."""
        if model == self.next_model == self.policy.ladder[-1]:
            raise error
        attempt = Attempt(model, "", accepted=False, reason=f"failed: {type(error).__name__}", error=str(error))
        self._call.move_past(attempt)  # refuses a model other than the one the walk is on
        return attempt

    def result(self) -> CascadeResult:
        served = self._call.served
        if served is None:
            raise RuntimeError("the cascade has not accepted an answer yet")
        return CascadeResult(served.model, served.text, self.attempts, self.start, self.decision)


class Cascade:
    """Runs queries through a ladder of generators (objects with ``name`` and ``generate(query)``).

    With a pre-generation ``router`` and ``skip_threshold``, each query starts at the first
    rung the router expects to succeed (the hybrid mode) and cascades from there.
    """

    def __init__(
        self,
        generators: Sequence[Any],
        policy: CascadePolicy,
        *,
        router: Any = None,
        skip_threshold: float | None = None,
        pool: Any = None,
    ) -> None:
        self.generators = {g.name: g for g in generators}
        missing = [m for m in policy.ladder if m not in self.generators]
        if missing:
            raise ValueError(f"no generator for ladder rungs {missing}; generators: {list(self.generators)}")
        if (router is None) != (skip_threshold is None):
            raise ValueError("the hybrid mode needs both a router and a skip_threshold")
        self.policy = policy
        self.router = router
        self.skip_threshold = skip_threshold
        self.cost_fn = pool_cost_fn(pool) if pool is not None else None

    def run(self, query: Any, *, max_new_tokens: int | None = None) -> CascadeResult:
        """Walk ``query`` up the ladder with the dispatch core: the same escalation rule
        (transient errors only) and attempt record as every other front end.

        In hybrid mode a local rung on the router's own model may start from the routing read-out's
        keys and values; they are kept for this query only and dropped when it is answered."""

        def invoke(model: str) -> Reply:
            out = self.generators[model].generate(query, max_new_tokens=max_new_tokens)
            # P(IK) comes out of the rung's own prefill, so it rides on the reply.
            return Reply(out, out.text, out.tokens, out.logprobs, out.prompt_tokens, out.completion_tokens, pik=out.pik)

        with ExitStack() as this_query:
            decision = None
            if self.router is not None:
                for generator in self.generators.values():
                    scope = getattr(generator, "reusing_routing_prefill", None)
                    if scope is not None:
                        this_query.enter_context(scope())
                decision = self.router.route(query)
            call = RoutedCall(
                decision=decision, cascade=self.policy, skip_threshold=self.skip_threshold, cost_fn=self.cost_fn
            )
            run_sync(call, invoke)
        assert call.served is not None
        return CascadeResult(call.served.model, call.served.text, call.attempts, call.start, decision)
