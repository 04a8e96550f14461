"""LangChain adapter for difficulty_router: a routing step for LCEL chains, a routing chat model, a
decision model (``langchain_core.decisions``) and an agent middleware (``langchain.agents``).

The last two load on first use: they need ``langchain-core>=1.8`` and ``langchain>=1.5.2``, which
the chat model does not.
"""

from typing import Any

from difficulty_router.calling.dispatch import RECORD_KEY
from difficulty_router.core.errors import is_transient_error

from ._convert import to_router_query
from ._tracing import message_reply
from .chat_model import ChatDifficultyRouter
from .runnable import DifficultyRouterRunnable, route_to

__all__ = [
    "RECORD_KEY",
    "ChatDifficultyRouter",
    "DifficultyDecisionModel",
    "DifficultyRouterMiddleware",
    "DifficultyRouterRunnable",
    "is_transient_error",
    "message_reply",
    "route_to",
    "to_router_query",
]

_LAZY = {"DifficultyDecisionModel": "decisions", "DifficultyRouterMiddleware": "middleware"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
