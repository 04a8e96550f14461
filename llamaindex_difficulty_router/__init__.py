"""LlamaIndex adapter for difficulty_router: a routed LLM and a RouterQueryEngine selector.

Thin by design: routing decisions come from ``difficulty_router.DifficultyRouter`` and each
call's walk (fallbacks, cascade, escalation, record) from ``difficulty_router.calling.dispatch``; this
package converts LlamaIndex messages, calls the chosen LLM and reports honest metadata.
"""

from ._convert import to_router_messages
from ._replies import response_reply, stream_reply
from .events import DifficultyEscalationEvent, DifficultyRouteEvent
from .llm import CANNOT_CALL_TOOLS, ROUTING_KEY, DifficultyRouterLLM, calls_tools
from .selector import DifficultySelector

__all__ = [
    "CANNOT_CALL_TOOLS",
    "ROUTING_KEY",
    "DifficultyEscalationEvent",
    "DifficultyRouteEvent",
    "DifficultyRouterLLM",
    "DifficultySelector",
    "calls_tools",
    "response_reply",
    "stream_reply",
    "to_router_messages",
]
