"""LangChain adapter for difficulty_router: a routing step for LCEL chains and a routing chat model."""

from ._convert import to_router_query
from .chat_model import CASCADE_KEY, ChatDifficultyRouter, is_transient_error, message_signals
from .runnable import DifficultyRouterRunnable, route_to

__all__ = ["ChatDifficultyRouter", "CASCADE_KEY", "message_signals", "DifficultyRouterRunnable", "route_to", "to_router_query", "is_transient_error"]
