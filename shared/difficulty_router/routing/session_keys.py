"""What the front ends need to route a session: a Sessions from what the user gave, a key, a prompt size.

The policies themselves are :mod:`difficulty_router.routing.sessions`; this module is the small shared
part every adapter would otherwise repeat: accepting ``sessions="sticky"`` as well as a
configured :class:`~difficulty_router.routing.sessions.Sessions`, reading a key from a LangChain run
config, deriving a stable key from a conversation's opening messages (for frameworks whose agents
carry no session id), and counting a prompt's tokens for the cache-aware policy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from difficulty_router.core.pool import CHARS_PER_TOKEN
from difficulty_router.data.queries import conversation_text, to_conversation
from difficulty_router.routing.sessions import SESSION_POLICIES, Sessions

CONFIG_KEYS = ("session_id", "thread_id")
"""``configurable`` entries read as the session key, in this order."""


def as_sessions(value: Any) -> Sessions | None:
    """``None``, a :class:`Sessions`, or a policy name (``Sessions(policy)`` with its defaults)."""
    if value is None or isinstance(value, Sessions):
        return value
    if isinstance(value, str):
        if value not in SESSION_POLICIES:
            raise ValueError(f"unknown session policy {value!r}; expected one of {SESSION_POLICIES} or a Sessions")
        return Sessions(value)
    raise TypeError(f"sessions must be a difficulty_router.Sessions or a policy name, got {type(value).__name__}")


def config_session_key(config: Mapping[str, Any] | None) -> str | None:
    """The session key of a LangChain/LangGraph run: ``configurable["session_id"]``, else
    ``configurable["thread_id"]`` (what a checkpointer keys a conversation by); None without either."""
    configurable = (config or {}).get("configurable") or {}
    for name in CONFIG_KEYS:
        value = configurable.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(f"configurable[{name!r}] must be a string (or an integer), got {type(value).__name__}")
        return str(value)
    return None


def conversation_key(query: Any) -> str:
    """A stable key for a conversation that carries no session id: a hash of its system messages
    and its first user message, prefixed ``conversation:``.

    Every later call of the same conversation (the agent's next step, the next user turn of the
    same chat history) opens the same way, so it maps to the same key. Two conversations that open
    identically (same system prompt, same first question) share a key: give an explicit session id
    where that matters.
    """
    conversation = to_conversation(query)
    head = []
    for message in conversation:
        if message["role"] in ("system", "developer"):
            head.append([message["role"], message["content"]])
        elif message["role"] == "user":
            head.append(["user", message["content"]])
            break
    else:  # no user message: the whole conversation is its own opening
        head = [[m["role"], m["content"]] for m in conversation]
    digest = hashlib.sha256(json.dumps(head, ensure_ascii=False).encode()).hexdigest()[:24]
    return f"conversation:{digest}"


def prompt_tokens(router: Any, query: Any) -> int:
    """The prompt's size in the extractor's tokens (what the pool's token prices scale), or at
    4 characters a token when the router has no tokenizer."""
    text = conversation_text(to_conversation(query))
    tokenizer = getattr(getattr(router, "extractor", None), "tokenizer", None)
    if tokenizer is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return round(len(text) / CHARS_PER_TOKEN)


def decide_in_session(
    binding: Any, query: Any, exclude: Mapping[str, str] | None = None, key: str | None = None
) -> Any:
    """``binding.decide`` for one turn of session ``key`` (counting the prompt's tokens for the
    policy), or per call when the binding has no sessions or there is no key."""
    if getattr(binding, "sessions", None) is None or key is None:
        return binding.decide(query, exclude)
    return binding.decide(query, exclude, session=key, context_tokens=prompt_tokens(binding.router, query))
