"""The detached, named Ray actors that hold what every Serve replica must share (sessions, the decision log).

Both are started by the driver before any replica, found again by name when a deployment restarts, and
refused when one left by an earlier deployment runs with other settings: its sessions would follow the old
bound and TTL, its log would go to the old file. One place for that life cycle, so the two stay alike.
"""

from __future__ import annotations

from typing import Any

from difficulty_router.scale.cluster import require_ray

#: the Ray namespace of every actor the package names, so a deployment finds the ones it started
NAMESPACE = "difficulty-router"
#: how long the driver waits for a starting actor to report its settings
START_TIMEOUT_S = 60


def start_named_actor(
    actor_class: type, name: str, args: tuple, wanted: dict[str, Any], *, what: str, drop_hint: str, **options: Any
) -> None:
    """Start the detached actor ``name`` from ``actor_class(*args)`` (no CPU, restarted when it dies) or find the
    running one, and check that its ``settings()`` are ``wanted``; ``what`` and ``drop_hint`` word the refusal."""
    ray = require_ray()
    remote = ray.remote(num_cpus=0, max_restarts=-1)(actor_class)
    actor = remote.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, **options).remote(
        *args
    )
    running = ray.get(actor.settings.remote(), timeout=START_TIMEOUT_S)
    if running != wanted:
        raise ValueError(f"the {what} {name!r} already runs with {running}, not {wanted}: end it with {drop_hint}")


def find_named_actor(name: str, *, what: str, hint: str) -> Any:
    """The running actor ``name`` (a replica opening its client); refused by name when none runs. ``what``
    names the actor and ``hint`` says how it is started."""
    ray = require_ray()
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no {what} named {name!r} in namespace {NAMESPACE!r}: {hint}") from None


def call_named_actor(method: Any, *args: Any, name: str, what: str, timeout_s: float) -> Any:
    """``method.remote(*args)``, waited for at most ``timeout_s``: a silent actor is a TimeoutError naming it,
    so a replica's request fails with a message rather than waiting forever."""
    ray = require_ray()
    try:
        return ray.get(method.remote(*args), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"the {what} {name!r} did not answer within {timeout_s:g} s") from None


def drop_named_actor(name: str) -> bool:
    """End the actor ``name``; True when one was running."""
    ray = require_ray()
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


__all__ = ["NAMESPACE", "call_named_actor", "drop_named_actor", "find_named_actor", "start_named_actor"]
