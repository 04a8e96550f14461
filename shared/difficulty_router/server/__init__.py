"""OpenAI-compatible routing server (``difficulty-router serve``); needs ``fastapi`` and ``uvicorn``."""

from difficulty_router.server.app import DEFAULT_ROUTER_NAME, create_app
from difficulty_router.server.backends import BackendFailure, Backends, BackendSpec, specs_from_pool
from difficulty_router.server.batching import MicroBatcher
from difficulty_router.server.metrics import ServerMetrics
from difficulty_router.server.schema import ApiError

__all__ = [
    "DEFAULT_ROUTER_NAME",
    "ApiError",
    "BackendFailure",
    "BackendSpec",
    "Backends",
    "MicroBatcher",
    "ServerMetrics",
    "create_app",
    "specs_from_pool",
]
