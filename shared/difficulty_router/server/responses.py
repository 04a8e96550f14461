"""What the client receives besides the backend's answer: the decision headers, the SSE relay, errors.

The decision travels in ``x-router-*`` headers (so unmodified OpenAI clients work and curious ones
can read why); a stream is relayed chunk by chunk with the serving backend's name, and a stream that
breaks after its headers were sent is reported in-band, as OpenAI does; every error is OpenAI-shaped
and counted.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.responses import Response

from difficulty_router.calling.dispatch import RoutedCall
from difficulty_router.server.guard import error_bytes
from difficulty_router.server.metrics import ServerMetrics
from difficulty_router.server.schema import ApiError

logger = logging.getLogger("difficulty_router.server.app")  # the app's log, as before these moved here


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` as compact JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_response(error: ApiError, metrics: ServerMetrics, headers: dict | None = None) -> Response:
    """The OpenAI-shaped error body for ``error``, counted in ``metrics``."""
    metrics.errors.inc(str(error.status), error.type)
    body = error_bytes(error.status, error.message, type=error.type, code=error.code, param=error.param)
    return Response(body, status_code=error.status, media_type="application/json", headers=headers)


def decision_headers(router_name: str | None, decision, served: str, tried: list[str], routing_s: float | None) -> dict:
    """The ``x-router-*`` headers of a served request (``decision`` None: a backend was asked directly)."""
    headers = {"x-router-model": served}
    if decision is None:
        headers["x-router-decision"] = "direct"
        return headers
    assert router_name is not None and routing_s is not None  # both come with a routing decision
    headers.update(
        {
            "x-router-name": router_name,
            "x-router-decision": decision.model,
            "x-router-probabilities": json.dumps(
                {m: round(p, 4) for m, p in decision.probabilities.items()}, separators=(",", ":")
            ),
            "x-router-difficulty": f"{decision.difficulty:.2f}",
            "x-router-latency-ms": f"{1000 * routing_s:.2f}",
            "x-router-truncated": "1" if decision.truncated else "0",
        }
    )
    if decision.novelty is not None:
        headers["x-router-novelty"] = f"{decision.novelty:.1f}"
        headers["x-router-ood"] = "1" if decision.ood else "0"
    if len(tried) > 1:
        headers["x-router-escalated-from"] = ",".join(tried[:-1])
    return headers


def session_headers(decision, call: RoutedCall) -> dict:
    """The session action and turn, and the shadow mode's would-be choice, as headers."""
    headers = {}
    session = getattr(decision, "session", None)
    if session is not None:
        headers["x-router-session-action"] = session["action"]
        headers["x-router-session-turn"] = str(session["turn"])
    if call.shadow is not None:
        headers["x-router-shadow-would-be"] = call.shadow["would_be"]
        headers["x-router-shadow-sampled"] = "1" if call.shadow["sampled"] else "0"
    return headers


async def relay(head: list[dict], tail, name: str):
    """A routed stream as server-sent events, each chunk naming the backend that served it: the chunks
    held back until the stream committed, then the rest. A break after commit (already counted by the
    dispatch hooks) ends the stream with an in-band error event and ``[DONE]``, as OpenAI does: the
    headers are sent, and text already shown cannot be taken back."""
    try:
        for chunk in head:
            chunk["model"] = name
            yield sse(chunk)
        async for chunk in tail:
            chunk["model"] = name
            yield sse(chunk)
    except Exception as exc:  # noqa: BLE001 (headers are sent: report in-band)
        logger.warning("stream from %s broke after it was committed: %s", name, exc)
        yield sse(ApiError(502, f"{name}: the stream broke; the server log has the cause", type="api_error").body())
    finally:
        await tail.aclose()
    yield b"data: [DONE]\n\n"


def store_unavailable(exc: Exception, request: Any) -> ApiError:
    """The 503 a request gets when its session store failed: the cause (store, address, error) goes to the log
    under the request id; the client learns only that the session store is unavailable."""
    request_id = request.scope.get("state", {}).get("request_id", "?")
    logger.warning("request %s: %s", request_id, exc)
    return ApiError(
        503,
        f"the session store is unavailable; try again shortly (the server logged the cause under request id "
        f"{request_id})",
        type="api_error",
        code="session_store_unavailable",
    )
