"""Keep-alive: the routing server must outlast its clients' idle connections, and its backend pool must not
outlast the backends' (issue 31: 2 of 2,462 requests lost under 64 clients with httpx ``ReadError``).

Both sides of a connection used to give up on it after 5 s idle (uvicorn's default keep-alive, httpx's
default idle expiry): a request sent as the server's timer fired was read by nobody and its connection was
reset. ``benchmarks/reliability.py`` showed it under load; here it is checked without load, on the real app
(uvicorn on loopback, the real router) and a raw socket whose timing the test controls.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from conftest import STRONG, WEAK
from llama_servers import dead_url
from server_helpers import running

from difficulty_router.server import Backends, BackendSpec, create_app
from difficulty_router.server.run import KEEP_ALIVE_S

HTTPX_IDLE_EXPIRY_S = httpx.Limits().keepalive_expiry  # what httpx and the openai package keep an idle connection
REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length body; b"" when the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_an_idle_connection_outlives_the_clients_idle_expiry(trained_router):
    """Reused after a pause longer than httpx's idle expiry (5 s), the same connection still answers.
    Under uvicorn's default keep-alive (5 s) the server has closed it by then: the test fails."""
    assert KEEP_ALIVE_S > 2 * HTTPX_IDLE_EXPIRY_S
    app = create_app(trained_router, [BackendSpec(WEAK, dead_url(), "small"), BackendSpec(STRONG, dead_url(), "large")])
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(REQUEST)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(HTTPX_IDLE_EXPIRY_S + 1.0)
            sock.sendall(REQUEST)
            again = read_response(sock)
    assert again.startswith(b"HTTP/1.1 200"), f"the server closed an idle connection a client may reuse: {again!r}"


@pytest.mark.asyncio
async def test_the_backend_pool_drops_idle_connections_before_backends_do():
    """The routing server's pool to its backends gives up on an idle connection before uvicorn (the server under
    vLLM and llama-cpp-python) closes it after 5 s; an equal timeout races, as it did on the client side."""
    import uvicorn

    backends = Backends([BackendSpec("m", dead_url(), "m")])
    await backends.start()
    try:
        pool = backends._http._transport._pool
        backend_keep_alive = uvicorn.Config(app=None).timeout_keep_alive
        assert pool._keepalive_expiry is not None and pool._keepalive_expiry <= backend_keep_alive / 2
    finally:
        await backends.aclose()
