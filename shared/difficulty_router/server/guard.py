"""The outermost layer of the app: request ids, the loopback rule, and no leaked internals.

Every response carries ``x-request-id``. An exception nobody handled is logged with that id
and its traceback, and the client gets a 500 that quotes only the id: exception text can
hold paths, keys or prompt fragments, and a stack trace tells an attacker which input broke
what. The loopback rule is enforced here, per request, rather than only where the CLI binds:
an app without an API key answers only loopback clients (unless its builder said a proxy in
front authenticates), however it is served (``difficulty-router serve``, ``serve()``, or
``uvicorn --host 0.0.0.0 module:app``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import uuid
from collections.abc import Callable

logger = logging.getLogger(__name__)


def error_bytes(status: int, message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """An OpenAI-style error body; ASCII JSON, so no client string can make it unencodable."""
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}}, ensure_ascii=True
    ).encode()


def is_loopback_client(scope: dict) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware; ``on_error(status, type)`` counts the errors it answers itself."""

    def __init__(self, app, *, loopback_only: bool, on_error: Callable[[int, str], None] | None = None) -> None:
        self.app, self.loopback_only, self.on_error = app, loopback_only, on_error

    async def _answer(self, send, status: int, body: bytes, request_id: str, extra=()) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"x-request-id", request_id.encode()),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _count(self, status: int, kind: str) -> None:
        if self.on_error is not None:
            self.on_error(status, kind)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if self.loopback_only and not is_loopback_client(scope):
            self._count(403, "permission_error")
            await self._answer(
                send,
                403,
                error_bytes(
                    403,
                    "this server has no API key, so it answers loopback clients only; start it with an API key "
                    "(--api-key-env), or allow unauthenticated access if a proxy in front authenticates",
                    type="permission_error",
                    code="unauthenticated_remote_client",
                ),
                request_id,
            )
            return
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if started:  # a stream was under way: nothing more can be said on this response
                return
            self._count(500, "server_error")
            await self._answer(
                send,
                500,
                error_bytes(
                    500,
                    f"internal error; the server logged the details under request id {request_id}",
                    type="server_error",
                    code="internal_error",
                ),
                request_id,
            )
