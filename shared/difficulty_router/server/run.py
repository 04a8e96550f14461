"""Running the app under uvicorn, with the one safety rule: no unauthenticated server off loopback.

A routing server holds the keys to paid backends; exposing it to a network without a token
would let anyone spend them. Binding a non-loopback address therefore needs an API key, or
an explicit ``allow_unauthenticated`` (for a server behind an authenticating proxy). The rule
is checked here, before binding, from what the app was built with, and again by the app on
every request (:mod:`.guard`), so it holds however the app is served.

Keep-alive: the server keeps an idle connection open for :data:`KEEP_ALIVE_S`, longer than the
clients it serves keep theirs (httpx and the ``openai`` package drop an idle connection after 5 s).
With uvicorn's default of 5 s, both sides gave up on an idle connection at the same moment: a
client that reused one just as the server's timer fired had its request read by nobody and got a
reset connection (httpx ``ReadError``), the 2 lost requests of 2,462 under 64 clients in
``benchmarks/reliability.py``. The side that sends must be the side that gives up first.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

#: Seconds an idle keep-alive connection stays open: longer than the idle expiry of the clients a
#: routing server sees (httpx and ``openai`` 5 s, aiohttp 15 s, browsers and load balancers up to 60 s),
#: so the client, which knows when it will send again, is always the one to close an idle connection.
KEEP_ALIVE_S = 75


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    if not infos:
        return False
    for info in infos:
        address = info[4][0]
        assert isinstance(address, str)  # getaddrinfo yields only AF_INET/AF_INET6 entries: a str address
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            return False
    return True


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool = False) -> None:
    if api_key is None and not allow_unauthenticated and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host!r} without authentication: it is not a loopback address. "
            f"Set a token with --api-key-env VAR, or pass --allow-unauthenticated if a proxy in "
            f"front of the server authenticates clients"
        )


def uvicorn_settings(log_level: str = "info") -> dict[str, Any]:
    """The uvicorn settings the routing server runs under: no access log, the keep-alive of :data:`KEEP_ALIVE_S`."""
    return {"log_level": log_level, "access_log": False, "timeout_keep_alive": KEEP_ALIVE_S}


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", **overrides: Any):
    """A ``uvicorn.Config`` with :func:`uvicorn_settings`, for tests and benchmarks that serve the app in a
    thread: they measure the server as :func:`serve` runs it."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, **{**uvicorn_settings(log_level), **overrides})


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve ``app`` (from :func:`~.app.create_app`); refuses a non-loopback ``host`` for an app without a key."""
    import uvicorn

    state = getattr(app, "state", None)
    check_exposure(host, getattr(state, "api_key", None), getattr(state, "allow_unauthenticated", False))
    uvicorn.run(app, host=host, port=port, **uvicorn_settings(log_level))
