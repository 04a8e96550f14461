"""OpenAI-compatible routing server (``difficulty-router serve``); needs ``fastapi`` and ``uvicorn``."""

from .app import DEFAULT_ROUTER_NAME, create_app
from .backends import BackendFailure, Backends, BackendSpec, specs_from_pool
from .batching import MicroBatcher
from .metrics import ServerMetrics
from .schema import ApiError

__all__ = ["create_app", "DEFAULT_ROUTER_NAME", "Backends", "BackendSpec", "BackendFailure", "specs_from_pool",
           "MicroBatcher", "ServerMetrics", "ApiError"]
