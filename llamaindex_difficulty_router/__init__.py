"""LlamaIndex adapter for difficulty_router: a routed LLM and a RouterQueryEngine selector.

Thin by design: routing decisions come from ``difficulty_router.DifficultyRouter``; this
package only converts LlamaIndex messages, delegates to the chosen LLM, escalates on
failure and reports honest metadata.
"""

from ._convert import to_router_messages
from .events import DifficultyEscalationEvent, DifficultyRouteEvent
from .llm import CANNOT_CALL_TOOLS, CASCADE_KEY, ROUTING_KEY, DifficultyRouterLLM, calls_tools, response_signals
from .selector import DifficultySelector

__all__ = [
    "DifficultyRouterLLM", "DifficultySelector", "DifficultyRouteEvent", "DifficultyEscalationEvent",
    "ROUTING_KEY", "CASCADE_KEY", "CANNOT_CALL_TOOLS", "response_signals", "calls_tools", "to_router_messages",
]
