"""Which provider errors move a call on to the next model: one rule for every front end.

An outage, a rate limit or a server-side error says nothing about the query, so the next more
capable model may well answer it; anything else (a TypeError from a misspelt argument, a bug in
a user's tool, a 400 for a malformed request) would fail there too, or worse, run the user's code
twice on the most expensive model. Such errors propagate unchanged.
"""

from __future__ import annotations

import asyncio

# Fragments of exception class names that mean "this provider is unavailable right now" across
# SDKs (openai, anthropic, httpx, google, ...), none of which this package imports.
TRANSIENT_NAMES = (
    "RateLimit",
    "Timeout",
    "TimedOut",
    "Connection",
    "Overloaded",
    "ServiceUnavailable",
    "InternalServerError",
    "ResourceExhausted",
    "TooManyRequests",
    # a connection dropped mid-response (a stream cut by a dying backend or a proxy): httpx, http.client, requests
    "RemoteProtocol",
    "IncompleteRead",
    "ChunkedEncoding",
)


def is_transient_error(exc: BaseException) -> bool:
    """Default escalation test: rate limits, timeouts, connection and server-side errors.

    An exception that classifies itself with a boolean ``transient`` attribute (the routing
    server's :class:`~difficulty_router.server.backends.BackendFailure`, from the HTTP status) is
    taken at its word, so one rule serves every front end.
    """
    declared = getattr(exc, "transient", None)
    if isinstance(declared, bool):
        return declared
    if isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    return any(frag in cls.__name__ for cls in type(exc).__mro__ for frag in TRANSIENT_NAMES)
