"""OpenAI-compatible routing server (``difficulty-router serve``); needs ``fastapi`` and ``uvicorn``."""

from .app import DEFAULT_ROUTER_NAME, create_app
from .backends import BackendFailure, Backends, BackendSpec, specs_from_pool
from .batching import MicroBatcher
from .metrics import ServerMetrics
from .schema import ApiError

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
