"""One decision log for every Ray Serve replica: a named Ray actor is its only writer.

Replicas are separate processes (and may be on other machines), so each appending to the file itself
would interleave or rotate under one another. Here each replica builds its records as the in-process
:class:`~difficulty_router.routing.decision_log.DecisionLog` does (prompt hash, read-out key, timestamp
where the decision was made) and hands the encoded line to one actor, placed on the driver's machine so
the file lands where ``--decision-log`` names it; the actor appends and rotates with that same class, one
line at a time, so the log stays append-only JSON Lines that ``report`` and ``feedback`` read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from difficulty_router.routing.decision_log import DecisionLog
from difficulty_router.scale.cluster import require_ray
from difficulty_router.scale.named_actors import call_named_actor, drop_named_actor, find_named_actor, start_named_actor
from difficulty_router.scale.ray_sessions import CALL_TIMEOUT_S


class DecisionLogActor:
    """The Ray actor: the only writer of one :class:`DecisionLog` file (a sync actor: one line at a time)."""

    def __init__(self, path: str, max_bytes: int | None) -> None:
        self.log = DecisionLog(path, max_bytes=max_bytes)

    def settings(self) -> dict[str, Any]:
        return {"path": os.fspath(self.log.path), "max_bytes": self.log.max_bytes, "backups": self.log.backups}

    def write_line(self, data: bytes) -> None:
        self.log.write_line(data)


def decision_log_name(app_name: str) -> str:
    return f"decisions/{app_name}"


def start_decision_log(name: str, path: str | os.PathLike, *, max_bytes: int | None = None) -> RayDecisionLog:
    """Start the writer actor ``name`` on this (the driver's) node for ``path`` (or find the running one)
    and return a client. The path and bound are checked here first by :class:`DecisionLog` itself; a
    writer left by an earlier deployment for another file or bound is refused, naming both."""
    ray = require_ray()
    path = os.path.abspath(path)
    local = DecisionLog(path, max_bytes=max_bytes)  # its own checks and messages (a directory, a bad bound)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    start_named_actor(
        DecisionLogActor,
        name,
        (path, max_bytes),
        {"path": path, "max_bytes": max_bytes, "backups": local.backups},
        what="decision log writer",
        drop_hint=f"difficulty_router.scale.ray_decision_log.drop_decision_log({name!r}) or serve with its settings",
        scheduling_strategy=here,
    )
    return RayDecisionLog(name)


def drop_decision_log(name: str) -> bool:
    """End the writer actor ``name`` (the file stays); True when one was running."""
    return drop_named_actor(name)


class RayDecisionLog(DecisionLog):
    """A :class:`DecisionLog` whose lines are written by the actor ``name``: records are built here (its
    ``append`` and ``log_call``), and each whole line crosses to the one writer."""

    def __init__(self, name: str, timeout_s: float = CALL_TIMEOUT_S) -> None:  # no file is opened here
        self._actor = find_named_actor(name, what="decision log writer", hint="start it with start_decision_log")
        self.name, self.timeout_s = name, float(timeout_s)
        settings = self._call(self._actor.settings)
        self.path, self.max_bytes, self.backups = Path(settings["path"]), settings["max_bytes"], settings["backups"]
        self.clock = time.time  # the record's time is the replica's, when the decision was made

    def _call(self, method, *args):
        return call_named_actor(method, *args, name=self.name, what="decision log writer", timeout_s=self.timeout_s)

    def write_line(self, data: bytes) -> None:
        self._call(self._actor.write_line, data)

    def __reduce__(self):
        return (RayDecisionLog, (self.name, self.timeout_s))
