"""Request validation and OpenAI-style errors.

Clients written against the OpenAI API parse ``{"error": {"message", "type", "param",
"code"}}`` and surface its message, so every refusal uses that shape and names the field
at fault. Validation checks what the router itself reads (model, messages) and the types
of the common sampling fields; anything else is passed to the backend untouched, so
backend-specific fields keep working.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..queries import ROLES


class ApiError(Exception):
    """An error the server answers with, in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise invalid("the request body is empty; expected a JSON object with 'model' and 'messages'")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None


def _number(body: dict, key: str, *, low: float | None = None, high: float | None = None) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{key}' must be a number, got {json.dumps(value)}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(f"'{key}' must be between {low} and {high}, got {value}", key)


def _positive_int(body: dict, key: str) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"'{key}' must be a positive integer, got {json.dumps(value)}", key)


def _message(msg: Any, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise invalid(f"{where} must be an object with 'role' and 'content', got {type(msg).__name__}", where)
    role = msg.get("role")
    if role is None:
        raise invalid(f"{where} has no 'role'", f"{where}.role")
    if role not in ROLES:
        raise invalid(f"{where}.role is {json.dumps(role)}; expected one of {sorted(ROLES)}", f"{where}.role")
    content = msg.get("content")
    if content is None:
        if role == "assistant" and (msg.get("tool_calls") or msg.get("function_call")):
            return
        raise invalid(f"{where} ({role}) has no 'content'", f"{where}.content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"{where}.content[{j}] must be an object with a 'type'", f"{where}.content")
    elif not isinstance(content, str):
        raise invalid(f"{where}.content must be a string or a list of content parts, got {type(content).__name__}",
                      f"{where}.content")


def validate_chat_request(body: Any) -> dict:
    """Check a chat completion body; returns it unchanged or raises a 400 ApiError."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter ('router' to route, or a backend's name)", "model")
    if not isinstance(model, str) or not model:
        raise invalid(f"'model' must be a non-empty string, got {json.dumps(model)}", "model")
    messages = body.get("messages")
    if messages is None:
        raise invalid("missing required parameter: 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of messages", "messages")
    for i, msg in enumerate(messages):
        _message(msg, i)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise invalid(f"'stream' must be true or false, got {json.dumps(body['stream'])}", "stream")
    _number(body, "temperature", low=0, high=2)
    _number(body, "top_p", low=0, high=1)
    for key in ("max_tokens", "max_completion_tokens", "n"):
        _positive_int(body, key)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise invalid("'tools' must be a list of tool objects", "tools")
    return body

