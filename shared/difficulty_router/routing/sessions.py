"""Routing a conversation, not a call: which model serves each turn of a session.

Agents and chat apps make many calls per task. Routing each one afresh hops between models,
which loses the provider's prompt cache (cached input tokens cost 10-50% of fresh ones), changes
voice mid-thread and breaks tool loops one model started. :class:`Sessions` turns the router's
per-call decision into the decision to serve for one turn of a session, under a policy:

- ``per_call``: the router's decision, unchanged (what a router without sessions does);
- ``sticky``: the first turn's choice stays, unless a later turn's predicted gain from escalating
  (P(success) of the more capable per-call choice minus the current model's) clears ``margin``;
  never a less capable model mid-session unless ``allow_deescalation=True`` (then only when the
  cheaper per-call choice loses at most ``margin`` of P(success));
- ``cache_aware``: the router's own policy re-run with session prices: staying on the current
  model pays the transcript already sent at the cached input price, switching pays the re-read
  of the whole transcript at the new model's full input price (needs token prices in the pool).

Session state lives in a bounded, thread-safe :class:`SessionStore` (LRU with a TTL) that the
adapters and the server share through the core, or in any store with its methods
(:class:`SessionStates`): Ray Serve's replicas share one held by a Ray actor (``scale.ray_sessions``), and
servers or replicas pointed at one Redis share its sessions (``routing.redis_sessions``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from difficulty_router.core.pool import ModelPool
from difficulty_router.learning.policies import Policy
from difficulty_router.routing.decision import RouteDecision

SESSION_POLICIES = ("per_call", "sticky", "cache_aware")
MAX_KEY_CHARS = 512
#: how many locks serialise the turns of one session in a process (sessions share a lock by their key's hash)
LOCK_STRIPES = 64


@dataclass
class SessionState:
    """Where one session stands after its last turn."""

    model: str  # the model the session is on
    turns: int
    context_tokens: int  # tokens of the transcript already sent (cached at the provider)
    switches: int
    last_seen: float
    previous_model: str | None = None  # the model before the last turn (None on the first)
    switches_before_turn: int = 0  # switches counted before the last turn (served() recounts from it)


def check_key(key: Any) -> str:
    """A session key is a non-empty string of at most :data:`MAX_KEY_CHARS` characters."""
    if not isinstance(key, str):
        raise TypeError(f"a session key must be a string, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise ValueError(f"a session key must have 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
    return key


class SessionStoreUnavailable(ConnectionError):
    """A store that other processes share (Redis, the Ray store actor) could not be reached or failed. The
    message names the store and its address (never a password); the server answers the request with a 503."""


@runtime_checkable
class SessionStates(Protocol):
    """What :class:`Sessions` needs of a store: :class:`SessionStore` in this process, or a store that
    processes share (``scale.ray_sessions.RaySessionStore``, one Ray actor behind every Serve replica), so
    the policy lives here once whichever holds the states. ``blocking``: its calls wait on another process,
    so an async caller (the server) calls it off its event loop."""

    max_sessions: int
    ttl_s: float
    blocking: bool

    def get(self, key: str) -> SessionState | None: ...

    def put(self, key: str, state: SessionState) -> None: ...

    def delete(self, key: str) -> bool: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...


class SessionStore:
    """Bounded LRU with TTL, thread-safe (a lock). Shared by adapters and the server.

    A session unseen for ``ttl_s`` seconds (by ``clock``) is forgotten; when more than
    ``max_sessions`` are held, the least recently used goes. ``get`` counts as use. States are
    copied in and out, so a caller's object never changes under another thread.
    """

    blocking = False  # in-process: a call never waits on another process

    def __init__(self, max_sessions: int = 10_000, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, got {max_sessions!r}")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a positive finite number of seconds, got {ttl_s!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {type(clock).__name__}")
        self.max_sessions, self.ttl_s, self.clock = max_sessions, float(ttl_s), clock
        self._states: OrderedDict[str, SessionState] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0  # sessions dropped because the store was full
        self.expired = 0  # sessions dropped because their TTL passed

    def _purge(self, now: float) -> None:
        # the dict is in last-use order, so expired sessions sit at the front
        while self._states:
            key, state = next(iter(self._states.items()))
            if now - state.last_seen < self.ttl_s:
                break
            del self._states[key]
            self.expired += 1

    def get(self, key: str) -> SessionState | None:
        check_key(key)
        with self._lock:
            now = self.clock()
            self._purge(now)
            state = self._states.get(key)
            if state is None:
                return None
            state.last_seen = now
            self._states.move_to_end(key)
            return replace(state)

    def put(self, key: str, state: SessionState) -> None:
        check_key(key)
        if not isinstance(state, SessionState):
            raise TypeError(f"state must be a SessionState, got {type(state).__name__}")
        with self._lock:
            now = self.clock()
            self._purge(now)
            self._states[key] = replace(state, last_seen=now)
            self._states.move_to_end(key)
            while len(self._states) > self.max_sessions:
                self._states.popitem(last=False)
                self.evicted += 1

    def delete(self, key: str) -> bool:
        """Forget a session (the conversation ended); True when it was held."""
        with self._lock:
            return self._states.pop(check_key(key), None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._purge(self.clock())
            return len(self._states)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(key) and self.get(key) is not None


class Sessions:
    """Applies a session policy to the router's per-call decisions (see the module docstring).

    ``pool`` prices the cache-aware policy (token prices, ``cached_input_cost_per_1m``); a
    :class:`~difficulty_router.calling.dispatch.Binding` fills it from its router when not given.
    ``capability_order`` (least to most capable) is read from each decision when not given.
    """

    def __init__(
        self,
        policy: str = "sticky",
        *,
        store: SessionStates | None = None,
        margin: float = 0.05,
        allow_deescalation: bool = False,
        pool: ModelPool | None = None,
        capability_order: Sequence[str] | None = None,
    ) -> None:
        if policy not in SESSION_POLICIES:
            raise ValueError(f"unknown session policy {policy!r}; expected one of {SESSION_POLICIES}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 1:
            raise ValueError(f"margin must be a number in [0, 1] (a difference of P(success)), got {margin!r}")
        if not isinstance(allow_deescalation, bool):
            raise TypeError(f"allow_deescalation must be True or False, got {allow_deescalation!r}")
        if store is not None and not isinstance(store, SessionStates):
            raise TypeError(f"store must be a SessionStore (or another SessionStates), got {type(store).__name__}")
        if pool is not None and not isinstance(pool, ModelPool):
            raise TypeError(f"pool must be a ModelPool, got {type(pool).__name__}")
        self.policy = policy
        self.store: SessionStates = store if store is not None else SessionStore()
        self.margin = float(margin)
        self.allow_deescalation = allow_deescalation
        self.pool = pool
        self.capability_order = list(capability_order) if capability_order is not None else None
        self.router_policy: Policy | None = None  # the bound router's policy (with its margin), for cache_aware
        # one turn of one session at a time (read, decide, write), through one of LOCK_STRIPES locks picked by the
        # session's key: turns of other sessions go on meanwhile, so a shared store that answers slowly (Redis,
        # the Ray actor) delays only the sessions that hash to the same stripe, not every session of the process
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def bind(self, router: Any) -> None:
        """Take the pool (and capability order) from a router when none was given."""
        if self.pool is None and isinstance(getattr(router, "pool", None), ModelPool):
            self.pool = router.pool
        if self.capability_order is None and callable(getattr(router, "capability_order", None)):
            self.capability_order = list(router.capability_order())
        if isinstance(getattr(router, "policy", None), Policy):
            self.router_policy = router.policy

    # -- the decision for one turn -----------------------------------------------------------
    def apply(self, key: str | None, decision: RouteDecision, *, context_tokens: int = 0) -> RouteDecision:
        """The decision to serve for this turn of session ``key``. key None or policy per_call: `decision` unchanged.

        Records the served model as the session's. The returned decision's ``session`` field says
        {key, policy, turn, action ("first" / "kept" / "switched"), switched, reason, per_call_choice,
        previous_model, switches, cached_tokens}. ``context_tokens``: the tokens of the whole prompt of
        this turn (the transcript so far); the previous turn's are taken as cached at the provider.
        """
        if key is None or self.policy == "per_call":
            return decision
        check_key(key)
        if not isinstance(decision, RouteDecision):
            raise TypeError(f"decision must be a RouteDecision, got {type(decision).__name__}")
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, (int, np.integer)) or context_tokens < 0:
            raise ValueError(f"context_tokens must be an integer >= 0, got {context_tokens!r}")
        with self._lock_for(key):
            state = self.store.get(key)
            order = self._order(decision)
            if state is None:
                model, action, reason, cached = decision.model, "first", "first turn: the router's choice", 0
            else:
                cached = min(state.context_tokens, int(context_tokens))
                model, reason = self._choose(state, decision, order, int(context_tokens), cached)
                action = "kept" if model == state.model else "switched"
            turn = 1 if state is None else state.turns + 1
            switches_before = 0 if state is None else state.switches
            switches = switches_before + (action == "switched")
            self.store.put(
                key,
                SessionState(
                    model=model,
                    turns=turn,
                    context_tokens=int(context_tokens),
                    switches=switches,
                    last_seen=0.0,
                    previous_model=None if state is None else state.model,
                    switches_before_turn=switches_before,
                ),
            )
        info = {
            "key": key,
            "policy": self.policy,
            "turn": turn,
            "action": action,
            "switched": action == "switched",
            "reason": reason,
            "per_call_choice": decision.model,
            "previous_model": None if state is None else state.model,
            "switches": switches,
            "cached_tokens": cached if action == "kept" else 0,
        }
        return self._serve(decision, model, order, info, context_tokens=int(context_tokens))

    def _lock_for(self, key: str) -> threading.Lock:
        return self._locks[hash(key) % LOCK_STRIPES]

    def model_for(self, key: str) -> str | None:
        state = self.store.get(key)
        return None if state is None else state.model

    def served(self, key: str | None, model: str) -> None:
        """Tell the session which model actually served (after fallbacks/escalation), so the next turn sticks to it."""
        if key is None or self.policy == "per_call":
            return
        with self._lock_for(key):
            state = self.store.get(key)
            if state is None or state.model == model:
                return
            changed = state.previous_model is not None and model != state.previous_model
            state.model = model
            state.switches = state.switches_before_turn + int(changed)
            self.store.put(key, state)

    # -- policies ----------------------------------------------------------------------------
    def _order(self, decision: RouteDecision) -> list[str]:
        order = list(self.capability_order or decision.capability_order)
        if not order:
            raise ValueError(
                "session routing needs the pool's capability order: route with a DifficultyRouter (its decisions "
                "carry it) or give Sessions(capability_order=[least ... most capable])"
            )
        missing = [m for m in decision.probabilities if m not in order]
        if missing:
            raise ValueError(f"the capability order {order} lacks the pool model(s) {missing}")
        return order

    def _choose(
        self, state: SessionState, decision: RouteDecision, order: list[str], context: int, cached: int
    ) -> tuple[str, str]:
        current, choice = state.model, decision.model
        if current not in decision.probabilities:
            return choice, f"{current!r} is not in this router's pool"
        if current in decision.skipped:
            return choice, f"{current!r} cannot serve this turn ({decision.skipped[current]})"
        if self.policy == "cache_aware":
            return self._cache_aware(current, decision, order, context, cached)
        p = decision.probabilities
        rank = {m: i for i, m in enumerate(order)}
        gain = p[choice] - p[current]
        if rank[choice] > rank[current]:
            if gain > self.margin:
                return choice, f"escalated: predicted gain {gain:+.3f} > margin {self.margin:g}"
            return current, f"kept: predicted gain of {choice!r} {gain:+.3f} <= margin {self.margin:g}"
        if rank[choice] < rank[current] and self.allow_deescalation and -gain <= self.margin:
            return choice, f"de-escalated: predicted loss {-gain:.3f} <= margin {self.margin:g}"
        if rank[choice] < rank[current]:
            return current, "kept: no de-escalation mid-session"
        return current, "kept: the router's choice"

    def turn_costs(self, decision: RouteDecision, current: str | None, context: int, cached: int) -> dict[str, float]:
        """This turn's cost per model: the current model reads ``cached`` tokens at its cached price,
        any other reads the whole ``context`` at its input price. Per-query prices and turns without a
        token count (``context`` 0) keep the decision's own costs."""
        if self.pool is None:
            raise ValueError(
                "the cache_aware policy needs the pool's token prices: give Sessions(pool=...) or bind it to a router"
            )
        out = {}
        outputs = decision.output_tokens or {}
        for name in decision.probabilities:
            entry = self.pool[name]
            if entry.cost_per_query is not None or context <= 0:
                out[name] = float(decision.costs.get(name, entry.cost(0.0)))
                continue
            out[name] = entry.cost(
                input_tokens=context,
                cached_tokens=cached if name == current else 0,
                output_tokens=outputs.get(name),
            )
        return out

    def _cache_aware(
        self, current: str, decision: RouteDecision, order: list[str], context: int, cached: int
    ) -> tuple[str, str]:
        models = list(decision.probabilities)
        costs = self.turn_costs(decision, current, context, cached)
        uncached = self.turn_costs(decision, None, context, 0)
        # normalise by the dearest uncached cost, as the router's policy does per call
        top = max(uncached.values()) or 1.0
        proba = np.array([[decision.probabilities[m] for m in models]])
        cost_row = np.array([[costs[m] / top for m in models]])
        cost_row = np.hstack([cost_row, np.ones((1, 1))])  # a dummy column pins the normaliser at 1
        proba_row = np.hstack([proba, np.zeros((1, 1))])
        rank = {m: i for i, m in enumerate(order)}
        capability = np.array([rank[m] for m in models] + [-1.0])
        eligible = np.array([[m not in decision.skipped for m in models] + [False]])
        policy = self.router_policy
        if policy is None or (policy.kind, policy.value) != (decision.policy, decision.parameter_value):
            policy = Policy(decision.policy, decision.parameter_value)
        kind = policy.kind
        model = models[int(policy.choose(proba_row, cost_row, capability, eligible)[0])]
        saving = uncached[current] - costs[current]
        if model == current:
            return current, f"kept: staying reads {cached} cached tokens (saves {saving:.6g})"
        return model, f"switched: its {kind} beats staying even after re-reading {context} tokens"

    def _serve(self, decision: RouteDecision, model: str, order: list[str], info: dict, context_tokens: int) -> Any:
        if model == decision.model:
            fallbacks = decision.fallbacks
        else:
            rank = order.index(model)
            fallbacks = tuple(m for m in order[rank + 1 :] if m not in decision.skipped and m in decision.probabilities)
        cost = decision.costs.get(model, decision.expected_cost)
        if self.policy == "cache_aware" and self.pool is not None:
            cost = self.turn_costs(
                decision, model if info["action"] != "switched" else None, context_tokens, info["cached_tokens"]
            )[model]
        return replace(decision, model=model, fallbacks=fallbacks, expected_cost=float(cost), session=info)


def session_summary(states: Mapping[str, SessionState]) -> dict[str, float]:
    """Turns and switches over a set of sessions (for reports)."""
    if not states:
        return {"sessions": 0, "turns": 0, "switches_per_session": 0.0}
    return {
        "sessions": len(states),
        "turns": sum(s.turns for s in states.values()),
        "switches_per_session": sum(s.switches for s in states.values()) / len(states),
    }
