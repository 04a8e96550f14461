"""Validate and normalise what callers pass as a query.

A query is either a plain string (one user turn) or a chat conversation: a list of
messages, each a mapping with ``role`` and ``content`` (OpenAI / Hugging Face style) or
a ``(role, content)`` pair. Everything downstream (the extractor, the policies, the
adapters) sees the same canonical form: a list of ``{"role": str, "content": str}``.
Errors name the offending query and message so a bad row in a 10k-line file is findable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from difficulty_router.data.jsonl import parse_json_line

Message = dict[str, str]
Conversation = list[Message]
Query = str | Sequence[Any]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _content_text(content: Any, where: str) -> str:
    """Flatten OpenAI-style content parts to text; images and audio carry no text to read."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                if part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
            else:
                raise ValueError(f"{where}: content part of type {type(part).__name__} is neither text nor a mapping")
        return "\n".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of content parts, got {type(content).__name__}")


def _tool_calls_text(tool_calls: Any, where: str) -> str:
    """Render an assistant's tool calls as text so the router reads what was asked of the tools."""
    if tool_calls is None:
        return ""
    if isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence):
        raise ValueError(f"{where}: tool_calls must be a list of tool calls, got {type(tool_calls).__name__}")
    lines = []
    for k, call in enumerate(tool_calls):
        if not isinstance(call, Mapping):
            raise ValueError(f"{where}: tool call {k} must be a mapping, got {type(call).__name__}")
        fn = call.get("function", call)
        if not isinstance(fn, Mapping):
            raise ValueError(
                f"{where}: tool call {k}: 'function' must be a mapping with 'name' and 'arguments', "
                f"got {type(fn).__name__}"
            )
        name = fn.get("name", "")
        args = fn.get("arguments", fn.get("args", ""))
        if not isinstance(args, str):
            try:
                args = json.dumps(args, sort_keys=True, default=str)
            except (TypeError, ValueError, RecursionError):
                raise ValueError(f"{where}: tool call {k}: arguments cannot be rendered as JSON") from None
        lines.append(f"[tool call] {name}({args})")
    return "\n".join(lines)


def _message(msg: Any, where: str) -> Message:
    if isinstance(msg, Mapping):
        if "role" not in msg:
            raise ValueError(f"{where}: message has no 'role' key (keys: {sorted(msg)})")
        role, content = msg["role"], msg.get("content")
        tool_calls = msg.get("tool_calls")
    elif isinstance(msg, (tuple, list)) and len(msg) == 2 and isinstance(msg[0], str):
        (role, content), tool_calls = msg, None
    else:
        raise ValueError(
            f"{where}: a message must be a mapping with 'role' and 'content' or a (role, content) pair, "
            f"got {type(msg).__name__}"
        )
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {sorted(ROLES)}")
    text = _content_text(content, where)
    calls = _tool_calls_text(tool_calls, where)
    if calls:
        text = f"{text}\n{calls}" if text else calls
    return {"role": role, "content": text}


def to_conversation(query: Any, index: int | None = None) -> Conversation:
    """Return the canonical conversation for one query, or raise ValueError naming the problem."""
    where = "query" if index is None else f"query {index}"
    if query is None:
        raise ValueError(f"{where} is None; expected a non-empty string or a list of chat messages")
    if isinstance(query, str):
        if not query.strip():
            raise ValueError(f"{where} is an empty string")
        return [{"role": "user", "content": query}]
    if isinstance(query, (bytes, bytearray)):
        raise ValueError(f"{where} is bytes; decode it to str first")
    if isinstance(query, Mapping):
        raise ValueError(f"{where} is a single mapping; wrap a message in a list to make a conversation")
    if not isinstance(query, Sequence):
        raise ValueError(f"{where} has type {type(query).__name__}; expected a string or a list of chat messages")
    if len(query) == 0:
        raise ValueError(f"{where} is an empty conversation")
    conversation = [_message(m, f"{where}, message {i}") for i, m in enumerate(query)]
    if not any(m["content"].strip() for m in conversation):
        raise ValueError(f"{where}: every message of the conversation is empty")
    return conversation


def to_conversations(queries: Any) -> list[Conversation]:
    """Normalise a batch; a bare string or a single conversation is a common slip, so refuse it clearly."""
    if isinstance(queries, str):
        raise ValueError("expected a list of queries, got a single string; wrap it in a list")
    if queries is None or not isinstance(queries, Sequence):
        raise ValueError(f"expected a list of queries, got {type(queries).__name__}")
    if len(queries) == 0:
        raise ValueError("expected at least one query, got an empty list")
    return [to_conversation(q, i) for i, q in enumerate(queries)]


def clip_conversation(conversation: Conversation, max_chars: int) -> tuple[Conversation, bool]:
    """The conversation's last ``max_chars`` characters of content, and whether anything was cut.

    Whole messages are dropped from the front, then the oldest kept message loses its head: the
    extractor reads a prompt's end, so this is the cheap, character-level version of its own
    token truncation, done before anything is tokenised.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if sum(len(m["content"]) for m in conversation) <= max_chars:
        return conversation, False
    kept, budget = [], max_chars
    for message in reversed(conversation):
        if budget <= 0:
            break
        content = message["content"]
        kept.append({**message, "content": content[-budget:]} if len(content) > budget else message)
        budget -= len(content)
    return kept[::-1], True


def conversation_text(conversation: Conversation) -> str:
    """Plain-text rendering for surface baselines (length, TF-IDF) that know no chat template."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in conversation)


QUERY_FIELDS = ("messages", "prompt", "query")


def query_from_json_line(line: str, where: str) -> Any:
    """One JSON Lines row of a query file: a JSON string, a message list, or an object whose first of
    ``messages``/``prompt``/``query`` holds the query. ``where`` names the row in errors (file and line)."""
    row = parse_json_line(line, where)
    if isinstance(row, dict):
        for key in QUERY_FIELDS:
            if key in row:
                return row[key]
        raise ValueError(f"{where}: object has none of 'prompt', 'messages', 'query'")
    return row
