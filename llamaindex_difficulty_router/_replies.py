"""LlamaIndex replies in the core's terms, the record attached to them, and escalation events.

A candidate's response (or a stream's chunks) becomes a :class:`difficulty_router.calling.dispatch.Reply`:
text, answer tokens and their logprobs (for a cascade's P(T)) and token usage. Logprobs come
from ``raw`` (the OpenAI completion or stream chunk of OpenAI/OpenAILike LLMs built with
``logprobs=True``), else from ``response.logprobs`` (the most likely alternative per position,
which is the generated token under greedy decoding).
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole

from difficulty_router.calling.confidence import MissingLogprobsError, openai_token_logprobs
from difficulty_router.calling.dispatch import RECORD_KEY, Hooks, Reply

from .events import DifficultyEscalationEvent, dispatcher


def response_reply(response: Any) -> Reply:
    """One response (chat, completion, or an agent's from ``predict_and_call``)."""
    return _reply(response, [response])


def stream_reply(chunks: list[Any]) -> Reply:
    """A buffered stream: the last chunk holds the whole text; logprobs are spread over the chunks."""
    return _reply(chunks, chunks)


def _reply(value: Any, parts: list[Any]) -> Reply:
    tokens: list[str] = []
    values: list[float] = []
    prompt_tokens = completion_tokens = 0
    for part in parts:
        found = _part_logprobs(part)
        if found is not None:
            tokens += found[0]
            values += found[1]
        usage = getattr(getattr(part, "raw", None), "usage", None)
        extra = getattr(part, "additional_kwargs", None) or {}
        p = getattr(usage, "prompt_tokens", None) or extra.get("prompt_tokens")
        c = getattr(usage, "completion_tokens", None) or extra.get("completion_tokens")
        prompt_tokens, completion_tokens = int(p or prompt_tokens), int(c or completion_tokens)
    return Reply(
        value, _text(parts[-1]) if parts else "", tokens or None, values or None, prompt_tokens, completion_tokens
    )


def _part_logprobs(part: Any) -> tuple | None:
    raw = getattr(part, "raw", None)
    if raw is not None:
        try:
            return openai_token_logprobs(raw)
        except MissingLogprobsError:
            pass
    alternatives = getattr(part, "logprobs", None)
    if alternatives:
        best = [max(options, key=lambda lp: lp.logprob) for options in alternatives if options]
        if best:
            return [lp.token for lp in best], [float(lp.logprob) for lp in best]
    return None


def _text(reply: Any) -> str:
    if isinstance(reply, ChatResponse):
        return reply.message.content or ""
    text = getattr(reply, "text", None)
    return text if isinstance(text, str) else str(getattr(reply, "response", "") or "")


def annotate(response: Any, record: dict[str, Any]) -> Any:
    """The routing record in ``additional_kwargs`` (or an agent response's ``metadata``)."""
    if isinstance(response, (ChatResponse, CompletionResponse)):
        response.additional_kwargs[RECORD_KEY] = record
    elif hasattr(response, "metadata"):  # AgentChatResponse from predict_and_call
        response.metadata = {**(response.metadata or {}), RECORD_KEY: record}
    return response


def empty_like(chat: bool) -> Any:
    """The one response an empty stream yields, so the caller still gets the routing record."""
    if chat:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=""), delta="")
    return CompletionResponse(text="", delta="")


class EscalationEvents(Hooks):
    """A :class:`DifficultyEscalationEvent` whenever a candidate fails or a cascade rung is rejected."""

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def _emit(self, model: str, why: str, nxt: str | None) -> None:
        dispatcher.event(
            DifficultyEscalationEvent(failed_model=model, error=why, next_model=nxt, operation=self.operation)
        )

    def end(self, call, handle, attempt, reply) -> None:
        if not attempt.accepted:
            self._emit(attempt.model, attempt.reason, call.next_model)

    def error(self, call, handle, attempt, exc) -> None:
        if attempt is not None:
            self._emit(attempt.model, attempt.error or "", call.next_model)
