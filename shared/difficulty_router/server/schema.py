"""Request validation, size limits and OpenAI-style errors.

Clients written against the OpenAI API parse ``{"error": {"message", "type", "param",
"code"}}`` and surface its message, so every refusal uses that shape and names the field
at fault. Validation checks what the router itself reads (model, messages, tool calls),
the types of the common sampling fields, and the :class:`Limits` that keep one request
from holding the routing thread or the event loop; anything else is passed to the backend
untouched, so backend-specific fields keep working. Error messages quote client values
only through ``json.dumps`` (ASCII, shortened), so a lone surrogate or a megabyte string
cannot break or bloat the error itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from difficulty_router.data.queries import ROLES


@dataclass(frozen=True)
class Limits:
    """What one chat request may hold; larger requests are refused with a 400/413 naming the limit.

    ``max_chars`` counts the characters of every message's text (content parts and tool call
    arguments included). ``max_depth`` bounds JSON nesting anywhere in the body (a chat request
    needs about 8 levels; deep nesting is a parser attack). ``max_tokens`` bounds
    ``max_tokens`` / ``max_completion_tokens``.
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 1024
    max_chars: int = 1_000_000
    max_n: int = 16
    max_tokens: int = 131_072
    max_depth: int = 32

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")


class ApiError(Exception):
    """An error the server answers with, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with a 413 once it passes ``limit`` bytes: a declared Content-Length is
    checked first, and a chunked body is counted while it arrives, so nothing larger is ever held."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(
        413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large"
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def quote(value: Any, limit: int = 80) -> str:
    """A client value for an error message: JSON, ASCII-only (lone surrogates become escapes), shortened."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json(raw: bytes, limits: Limits = Limits()) -> Any:
    """Decode the body; refuses invalid JSON, invalid Unicode and nesting deeper than ``limits.max_depth``."""
    if not raw.strip():
        raise invalid("the request body is empty; expected a JSON object with 'model' and 'messages'")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise invalid(f"the request body is nested too deeply (at most {limits.max_depth} levels)") from None
    except json.JSONDecodeError as exc:
        raise invalid(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise invalid("the request body is not valid JSON: it is not UTF-8 text") from None
    _check_tree(body, limits.max_depth)
    return body


def _check_tree(value: Any, max_depth: int) -> None:
    """Walk the decoded body without recursion: nesting depth, and strings that are valid Unicode
    (JSON's \\ud800 escapes decode to lone surrogates, which no backend can be sent)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise invalid(
                        "the request body holds a string that is not valid Unicode (a lone surrogate such as \\ud800)"
                    ) from None
            continue
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise invalid(f"the request body is nested too deeply (at most {max_depth} levels)")
            children = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            for key, child in children:
                if key is not None:
                    stack.append((key, depth))
                stack.append((child, depth + 1))


def _number(body: dict, key: str, *, low: float | None = None, high: float | None = None) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{key}' must be a number, got {quote(value)}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(f"'{key}' must be between {low} and {high}, got {value}", key)


def _positive_int(body: dict, key: str, most: int) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"'{key}' must be a positive integer, got {quote(value)}", key)
    if value > most:
        raise invalid(f"'{key}' must be at most {most} on this server, got {value}", key)


def _tool_calls(calls: Any, where: str) -> int:
    """Check an assistant message's ``tool_calls``; returns the characters of their names and arguments."""
    param = f"{where}.tool_calls"
    if not isinstance(calls, list):
        raise invalid(f"{param} must be a list of tool calls, got {type(calls).__name__}", param)
    chars = 0
    for k, call in enumerate(calls):
        if not isinstance(call, dict):
            raise invalid(f"{param}[{k}] must be an object, got {type(call).__name__}", param)
        function = call.get("function")
        if not isinstance(function, dict):
            raise invalid(
                f"{param}[{k}].function must be an object with 'name' and 'arguments', got {type(function).__name__}",
                param,
            )
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str):
            raise invalid(f"{param}[{k}].function.name must be a string, got {quote(name)}", param)
        if arguments is not None and not isinstance(arguments, str):
            raise invalid(
                f"{param}[{k}].function.arguments must be a JSON string, got {type(arguments).__name__}", param
            )
        chars += len(name) + len(arguments or "")
    return chars


def _message(msg: Any, i: int) -> int:
    """Check one message; returns the characters of text it holds."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise invalid(f"{where} must be an object with 'role' and 'content', got {type(msg).__name__}", where)
    role = msg.get("role")
    if role is None:
        raise invalid(f"{where} has no 'role'", f"{where}.role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid(f"{where}.role is {quote(role)}; expected one of {sorted(ROLES)}", f"{where}.role")
    for key in ("name", "tool_call_id"):
        if key in msg and msg[key] is not None and not isinstance(msg[key], str):
            raise invalid(f"{where}.{key} must be a string, got {type(msg[key]).__name__}", f"{where}.{key}")
    chars = 0
    if msg.get("tool_calls") is not None:
        chars += _tool_calls(msg["tool_calls"], where)
    content = msg.get("content")
    if content is None:
        if role == "assistant" and (msg.get("tool_calls") or msg.get("function_call")):
            return chars
        raise invalid(f"{where} ({role}) has no 'content'", f"{where}.content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"{where}.content[{j}] must be an object with a 'type'", f"{where}.content")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise invalid(
                        f"{where}.content[{j}] is a text part whose 'text' is not a string", f"{where}.content"
                    )
                chars += len(part["text"])
    elif isinstance(content, str):
        chars += len(content)
    else:
        raise invalid(
            f"{where}.content must be a string or a list of content parts, got {type(content).__name__}",
            f"{where}.content",
        )
    return chars


def validate_chat_request(body: Any, limits: Limits = Limits()) -> dict:
    """Check a chat completion body against its schema and ``limits``; returns it unchanged or raises a 400."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter ('router' to route, or a backend's name)", "model")
    if not isinstance(model, str) or not model:
        raise invalid(f"'model' must be a non-empty string, got {quote(model)}", "model")
    messages = body.get("messages")
    if messages is None:
        raise invalid("missing required parameter: 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of messages", "messages")
    if len(messages) > limits.max_messages:
        raise invalid(
            f"'messages' holds {len(messages)} messages; this server takes at most "
            f"{limits.max_messages} messages a request",
            "messages",
        )
    chars = sum(_message(msg, i) for i, msg in enumerate(messages))
    if chars > limits.max_chars:
        raise invalid(
            f"the messages hold {chars} characters; this server takes at most {limits.max_chars} characters a request",
            "messages",
            code="context_length_exceeded",
        )
    if "stream" in body and not isinstance(body["stream"], bool):
        raise invalid(f"'stream' must be true or false, got {quote(body['stream'])}", "stream")
    _number(body, "temperature", low=0, high=2)
    _number(body, "top_p", low=0, high=1)
    for key in ("max_tokens", "max_completion_tokens"):
        _positive_int(body, key, limits.max_tokens)
    _positive_int(body, "n", limits.max_n)
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise invalid("'tools' must be a list of tool objects", "tools")
    return body
