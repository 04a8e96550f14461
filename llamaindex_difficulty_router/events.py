"""Instrumentation events for routing.

The adapter emits no LLM events of its own: the chosen model emits those (so token counts
and LLM event counts are the same as calling that model directly). What the adapter adds
is what only it knows: the routing decision and any escalation, inside the same span as
the delegated call, so handlers can tie them to the LLM events they see.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.base import BaseEvent

dispatcher = get_dispatcher("llamaindex_difficulty_router")


class DifficultyRouteEvent(BaseEvent):
    """The router picked ``model`` for a call; ``decision`` is ``RouteDecision.to_dict()``."""

    model: str
    decision: dict[str, Any]
    operation: str

    @classmethod
    def class_name(cls) -> str:
        return "DifficultyRouteEvent"


class DifficultyEscalationEvent(BaseEvent):
    """``failed_model`` raised; ``next_model`` (None when none is left) gets the call next."""

    failed_model: str
    error: str
    next_model: str | None = None
    operation: str

    @classmethod
    def class_name(cls) -> str:
        return "DifficultyEscalationEvent"
