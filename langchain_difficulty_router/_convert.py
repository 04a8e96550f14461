"""LangChain inputs -> the core's query form (a string or a list of OpenAI-style message dicts).

The router must read the whole conversation (system prompt, history, tool calls and
results), so every message is converted, not just the last user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_messages, convert_to_openai_messages
from langchain_core.prompt_values import PromptValue, StringPromptValue

from difficulty_router.data.queries import ROLES


def to_router_query(value: Any) -> str | list[dict]:
    """Convert a chain input (str, PromptValue, message or message list) for ``router.route``."""
    if isinstance(value, str):
        return value
    if isinstance(value, StringPromptValue):
        return value.to_string()
    if isinstance(value, PromptValue):
        messages = value.to_messages()
    elif isinstance(value, BaseMessage):
        messages = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        try:
            messages = convert_to_messages(value)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ValueError(f"cannot route this message list: {exc}") from exc
    else:
        raise TypeError(
            f"cannot route an input of type {type(value).__name__}; expected a string, "
            "a PromptValue, a message or a list of messages"
        )
    if not messages:
        raise ValueError("cannot route an empty message list")
    return [_known_role(m) for m in convert_to_openai_messages(messages)]


def _known_role(message: dict) -> dict:
    # ChatMessage allows any role; the router reads its text as a user turn rather than refuse it.
    if message.get("role") not in ROLES:
        return {**message, "role": "user"}
    return message
