"""What the server does after a routed response has gone out: the shadow sample and the decision log.

Both run as a background task, so the client never waits for them: in shadow mode a sampled
request is also sent to the model the router would have chosen (its answer becomes a label), and
every routed request's decision is written to the decision log, joined later with its grade by
query id. A label that could not be collected is recorded, never raised.
"""

from __future__ import annotations

import asyncio

from difficulty_router.calling.dispatch import Reply, RoutedCall
from difficulty_router.routing.decision_log import DecisionLog
from difficulty_router.routing.router import DifficultyRouter
from difficulty_router.server.backends import Backends


async def follow_up(
    call: RoutedCall, body: dict, backends: Backends, decision_log: DecisionLog | None, router: DifficultyRouter
) -> None:
    """After the response: ask the sampled alternative (shadow mode) and write the decision log."""
    alternative = call.sample_alternative
    if alternative is not None:
        try:
            data = await backends.complete(alternative, {**body, "stream": False})
            usage = data.get("usage") or {}
            message = (data.get("choices") or [{}])[0].get("message") or {}
            call.alternative_reply = Reply(
                data,
                text=str(message.get("content") or ""),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        except Exception as exc:  # noqa: BLE001 - a label we could not collect is logged, never raised
            call.alternative_failed(exc)
    if decision_log is not None:
        await asyncio.to_thread(call.log_to, decision_log, body["messages"], router)
