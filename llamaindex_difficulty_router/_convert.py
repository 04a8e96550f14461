"""LlamaIndex chat messages -> the core's conversation form, and the routing call itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    CitableBlock,
    CitationBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)

# LlamaIndex has provider-specific names for the assistant turn; the core knows OpenAI's roles.
_ROLE_ALIASES = {MessageRole.CHATBOT.value: "assistant", MessageRole.MODEL.value: "assistant"}


def _block_texts(blocks: Sequence[Any]) -> list[str]:
    texts: list[str] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, CitableBlock):
            texts.extend(b.text for b in block.content if isinstance(b, TextBlock))
        elif isinstance(block, CitationBlock) and isinstance(block.cited_content, TextBlock):
            texts.append(block.cited_content.text)
    return texts


def _tool_calls(message: ChatMessage) -> list[dict]:
    """Tool calls in OpenAI form: from ToolCallBlocks (0.14) or a provider's additional_kwargs."""
    calls = [
        {"function": {"name": b.tool_name, "arguments": b.tool_kwargs}}
        for b in message.blocks
        if isinstance(b, ToolCallBlock)
    ]
    for call in message.additional_kwargs.get("tool_calls") or []:
        if hasattr(call, "model_dump"):
            call = call.model_dump()
        if isinstance(call, Mapping):
            calls.append(dict(call))
    return calls


def to_router_messages(messages: Any, where: str = "messages") -> list[dict]:
    """The whole conversation as the core reads it: every turn, tool calls rendered, images dropped."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"{where} must be a list of ChatMessage, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError(f"{where} is empty; there is no conversation to route")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, ChatMessage):
            raise TypeError(f"{where}[{i}] must be a ChatMessage, got {type(message).__name__}")
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        entry: dict[str, Any] = {
            "role": _ROLE_ALIASES.get(role, role),
            "content": "\n".join(_block_texts(message.blocks)),
        }
        calls = _tool_calls(message)
        if calls:
            entry["tool_calls"] = calls
        out.append(entry)
    return out


def tool_conversation(user_msg: Any, chat_history: Any) -> list[ChatMessage]:
    """What a ``*_with_tools`` call will send: the history plus the new user turn."""
    messages = list(chat_history or [])
    if isinstance(user_msg, str):
        messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
    elif user_msg is not None:
        messages.append(user_msg)
    return messages


def route(router: Any, query: Any, exclude: dict[str, str] | None = None):
    # Async callers run this in worker threads; the extractor serialises its own forward passes.
    return router.route(query, exclude=exclude or None)


def check_router(router: Any) -> None:
    if not callable(getattr(router, "route", None)) or not isinstance(getattr(router, "models", None), list):
        raise TypeError(
            "router must be a difficulty_router.DifficultyRouter (with .route and .models), "
            f"got {type(router).__name__}"
        )
