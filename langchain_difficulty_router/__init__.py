"""LangChain adapter for difficulty_router: a routing step for LCEL chains and a routing chat model."""

from difficulty_router.dispatch import RECORD_KEY
from difficulty_router.errors import is_transient_error

from ._convert import to_router_query
from ._tracing import message_reply
from .chat_model import ChatDifficultyRouter
from .runnable import DifficultyRouterRunnable, route_to

__all__ = [
    "RECORD_KEY",
    "ChatDifficultyRouter",
    "DifficultyRouterRunnable",
    "is_transient_error",
    "message_reply",
    "route_to",
    "to_router_query",
]
