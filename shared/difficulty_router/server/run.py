"""Running the app under uvicorn, with the one safety rule: no unauthenticated server off loopback.

A routing server holds the keys to paid backends; exposing it to a network without a token
would let anyone spend them. Binding a non-loopback address therefore needs an API key, or
an explicit ``allow_unauthenticated`` (for a server behind an authenticating proxy). The rule
is checked here, before binding, from what the app was built with, and again by the app on
every request (:mod:`.guard`), so it holds however the app is served.
"""

from __future__ import annotations

import ipaddress
import socket


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


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve ``app`` (from :func:`~.app.create_app`); refuses a non-loopback ``host`` for an app without a key."""
    import uvicorn

    state = getattr(app, "state", None)
    check_exposure(host, getattr(state, "api_key", None), getattr(state, "allow_unauthenticated", False))
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
