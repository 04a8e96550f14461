"""A front end's models bound, once, to the router and/or cascade they serve, and a routed call started per query.

:class:`Binding` checks the fit when a front end is built (pool names, the cascade's ladder,
P(IK) scorers, sessions, shadow mode) and sets the escalation rule and retries for every call;
per call it decides (the router, under the session policy) and starts a
:class:`~.routed_call.RoutedCall` wired to the session, shadow mode and decision log.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from difficulty_router.calling.attempt import pool_cost_fn
from difficulty_router.calling.cascade_policy import CascadePolicy
from difficulty_router.calling.dispatch.holdback import StreamHoldback
from difficulty_router.calling.dispatch.routed_call import Retry, RoutedCall, shadow_plan
from difficulty_router.core.errors import is_transient_error

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

    ``stream_holdback``: a :class:`~.holdback.StreamHoldback` for every routed stream (a stream that
    breaks while held back escalates unseen); default off, streams commit at their first chunk.
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
        stream_holdback: StreamHoldback | None = None,
    ) -> None:
        if stream_holdback is not None and not isinstance(stream_holdback, StreamHoldback):
            raise TypeError(
                f"stream_holdback must be a difficulty_router.StreamHoldback, got {type(stream_holdback).__name__}"
            )
        self.stream_holdback = stream_holdback
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
            raise TypeError(f"sessions must be a difficulty_router.Sessions, got {type(sessions).__name__}")
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
            raise TypeError(f"cascade must be a difficulty_router.CascadePolicy, got {type(self.cascade).__name__}")
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
            shadow = shadow_plan(self.shadow, decision, sampled)
        on_done, query_id = None, None
        if self.decision_log is not None and decision is not None:
            log, router = self.decision_log, self.router
            query_id = new_query_id()

            def on_done(call: RoutedCall) -> None:
                call.log_to(log, query, router)

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
            holdback=self.stream_holdback,
        )


def new_query_id() -> str:
    """A fresh id for one logged call (random, 128 bits): the key ``difficulty-router feedback`` joins grades on."""
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
