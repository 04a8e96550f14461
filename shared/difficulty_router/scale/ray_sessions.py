"""Sessions shared by every Ray Serve replica: one named Ray actor holds the session states.

Replicas are separate processes, so a store per replica would let a conversation's turns meet different
states and hop between models (losing the provider's prompt cache). Here the states live in one
:class:`~difficulty_router.routing.sessions.SessionStore` inside a named, detached Ray actor (no new
service), and each replica's :class:`~difficulty_router.routing.sessions.Sessions` reads and writes it
through :class:`RaySessionStore`. The policy stays in ``routing.sessions``; only where the states live
changes, so TTL, ``max_sessions`` and key checks are the in-process store's own.

Limits: ``Sessions`` serialises one session's read-decide-write within a replica; two turns of one
session decided at the same moment on two replicas both read the earlier state, and the later write
wins (one conversation's turns normally come one after another). The actor keeps states in memory: if
it dies, Ray restarts it empty and sessions begin again at their next turn. Detached, it outlives the
driver like the Serve application does; :func:`drop_session_store` ends it.
"""

from __future__ import annotations

from typing import Any

from difficulty_router.routing.sessions import SessionState, SessionStore, SessionStoreUnavailable, check_key
from difficulty_router.scale.cluster import require_ray
from difficulty_router.scale.named_actors import call_named_actor, drop_named_actor, find_named_actor, start_named_actor

#: how long a replica waits for the store actor before the request fails with a message naming it
CALL_TIMEOUT_S = 10.0


class StoreActorTimeout(SessionStoreUnavailable, TimeoutError):
    """The store actor did not answer in time (the server answers the request with a 503)."""


class SessionStoreActor:
    """The Ray actor: one in-process :class:`SessionStore`; calls run one at a time (a sync actor)."""

    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self.store = SessionStore(max_sessions=max_sessions, ttl_s=ttl_s)

    def settings(self) -> dict[str, Any]:
        return {"max_sessions": self.store.max_sessions, "ttl_s": self.store.ttl_s}

    def get(self, key: str) -> SessionState | None:
        return self.store.get(key)

    def put(self, key: str, state: SessionState) -> None:
        self.store.put(key, state)

    def delete(self, key: str) -> bool:
        return self.store.delete(key)

    def size(self) -> int:
        return len(self.store)

    def counts(self) -> dict[str, int]:
        """Sessions held, and those dropped for a full store or a passed TTL."""
        return {"sessions": len(self.store), "evicted": self.store.evicted, "expired": self.store.expired}


def session_store_name(app_name: str, router: str) -> str:
    """The actor's name for one router of one Serve application (each router keeps its own sessions)."""
    return f"sessions/{app_name}/{router}"


def start_session_store(name: str, *, max_sessions: int = 10_000, ttl_s: float = 3600.0) -> RaySessionStore:
    """Start the store actor ``name`` (or find the running one) and return a client for it.

    The settings are checked here, in the driver, before any replica starts: a bad value is refused by
    ``SessionStore`` itself, and an actor left running by an earlier deployment with other settings is
    refused with its settings named (its sessions would otherwise follow the old TTL and bound)."""
    SessionStore(max_sessions=max_sessions, ttl_s=ttl_s)  # the store's own checks, with its messages
    start_named_actor(
        SessionStoreActor,
        name,
        (max_sessions, ttl_s),
        {"max_sessions": max_sessions, "ttl_s": float(ttl_s)},
        what="session store",
        drop_hint=f"difficulty_router.scale.ray_sessions.drop_session_store({name!r}) (its sessions go) or serve "
        "with its settings",
    )
    return RaySessionStore(name)


def drop_session_store(name: str) -> bool:
    """End the store actor ``name`` and forget its sessions; True when one was running."""
    return drop_named_actor(name)


class RaySessionStore:
    """A :class:`~difficulty_router.routing.sessions.SessionStates` whose states live in the store actor
    ``name`` (started by :func:`start_session_store`); every replica that opens it shares its sessions.

    Keys and states are checked here too, so a bad one is refused with the in-process store's message
    before a call crosses to the actor. Each call waits at most ``timeout_s`` for the actor."""

    blocking = True  # each call is a round trip to the actor: the server calls it off its event loop

    def __init__(self, name: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._actor = find_named_actor(
            name,
            what="session store actor",
            hint="start it with start_session_store (build_app does, for session policies other than per_call)",
        )
        self.name, self.timeout_s = name, float(timeout_s)
        settings = self._call(self._actor.settings)
        self.max_sessions, self.ttl_s = int(settings["max_sessions"]), float(settings["ttl_s"])

    def _call(self, method, *args):
        try:
            return call_named_actor(method, *args, name=self.name, what="session store actor", timeout_s=self.timeout_s)
        except TimeoutError as exc:  # a store that cannot answer: the server answers the request with a 503
            raise StoreActorTimeout(str(exc)) from None
        except require_ray().exceptions.RayActorError as exc:  # dead, or restarting (ActorUnavailableError): a 503 too
            raise SessionStoreUnavailable(
                f"the session store actor {self.name!r} is unavailable ({type(exc).__name__}; Ray restarts it "
                "empty, and sessions begin again at their next turn)"
            ) from None

    def get(self, key: str) -> SessionState | None:
        return self._call(self._actor.get, check_key(key))

    def put(self, key: str, state: SessionState) -> None:
        check_key(key)
        if not isinstance(state, SessionState):
            raise TypeError(f"state must be a SessionState, got {type(state).__name__}")
        self._call(self._actor.put, key, state)

    def delete(self, key: str) -> bool:
        """Forget a session (the conversation ended); True when it was held."""
        return self._call(self._actor.delete, check_key(key))

    def counts(self) -> dict[str, int]:
        """Sessions held, evicted (store full) and expired (TTL passed), over all replicas."""
        return self._call(self._actor.counts)

    def __len__(self) -> int:
        return self._call(self._actor.size)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(key) and self.get(key) is not None

    def __reduce__(self):
        # a client pickles as its name: the replica that unpickles it looks the actor up again
        return (RaySessionStore, (self.name, self.timeout_s))
