"""LangChain's side of one routed call: a pool model's message in the core's terms, and one
child chain run per attempt under the router's chat-model run (the dispatch core's hooks)."""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata, add_usage
from langchain_core.outputs import ChatGenerationChunk

from difficulty_router.calling import dispatch
from difficulty_router.calling.confidence import MissingLogprobsError, openai_token_logprobs
from difficulty_router.calling.dispatch import RECORD_KEY, Hooks, Reply


def message_reply(message: BaseMessage) -> Reply:
    """A pool model's message in the core's terms: text, answer logprobs (P(T)) and token usage."""
    tokens = logprobs = None
    raw = (message.response_metadata or {}).get("logprobs")
    if raw is not None:
        with contextlib.suppress(MissingLogprobsError):
            tokens, logprobs = openai_token_logprobs(raw)
    usage = getattr(message, "usage_metadata", None) or {}
    return Reply(
        message,
        message.text,
        tokens,
        logprobs,
        int(usage.get("input_tokens") or 0),
        int(usage.get("output_tokens") or 0),
    )


def join_chunks(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    return functools.reduce(operator.add, chunks) if chunks else AIMessageChunk(content="")


class AttemptRuns(Hooks):
    """One child chain run per attempt under the router's chat-model run."""

    def __init__(self, run_manager: Any, messages: list[BaseMessage]) -> None:
        self.run_manager, self.messages = run_manager, messages

    def _manager(self, cls: type, call: dispatch.RoutedCall, model: str) -> Any:
        # LLM run managers have no get_child(); build the child the way ParentRunManager does.
        rm = self.run_manager
        manager = cls(handlers=[], parent_run_id=rm.run_id)
        manager.set_handlers(rm.inheritable_handlers)
        manager.add_tags(rm.inheritable_tags)
        manager.add_metadata(rm.inheritable_metadata)
        manager.add_tags([f"{RECORD_KEY}:{model}"], inherit=False)
        manager.add_metadata(
            {"difficulty_router_model": model, "difficulty_router_attempt": len(call.attempts)}, inherit=False
        )
        return manager

    def _inputs(self, call: dispatch.RoutedCall, model: str) -> dict:
        record = call.record()
        return {
            "messages": self.messages,
            "model": model,
            "decision": record["decision"],
            "previous_attempts": record["attempts"],
        }

    def start(self, call, model):
        if self.run_manager is None:
            return None
        return self._manager(CallbackManager, call, model).on_chain_start(
            {"name": model}, self._inputs(call, model), name=model
        )

    async def astart(self, call, model):
        if self.run_manager is None:
            return None
        return await self._manager(AsyncCallbackManager, call, model).on_chain_start(
            {"name": model}, self._inputs(call, model), name=model
        )

    @staticmethod
    def _outputs(attempt, reply) -> dict:
        outputs: dict[str, Any] = {RECORD_KEY: dispatch.attempt_record(attempt)}
        if isinstance(reply.value, BaseMessage):  # a committed stream's chunks went to the caller
            outputs["output"] = reply.value
        return outputs

    def end(self, call, handle, attempt, reply):
        if handle is not None:
            handle.on_chain_end(self._outputs(attempt, reply))

    async def aend(self, call, handle, attempt, reply):
        if handle is not None:
            await handle.on_chain_end(self._outputs(attempt, reply))

    def error(self, call, handle, attempt, exc):
        if handle is not None:
            handle.on_chain_error(exc)

    async def aerror(self, call, handle, attempt, exc):
        if handle is not None:
            await handle.on_chain_error(exc)


def with_record(message: Any, call: dispatch.RoutedCall) -> Any:
    """The record in ``response_metadata``; the tokens of attempts before the served one in its usage."""
    assert call.served is not None
    metadata = dict(message.response_metadata or {})
    metadata.setdefault("model_name", call.served.model)
    metadata[RECORD_KEY] = call.record()
    update: dict[str, Any] = {"response_metadata": metadata}
    earlier = [a for a in call.attempts if a is not call.served and (a.prompt_tokens or a.completion_tokens)]
    if earlier:
        prompt, completion = sum(a.prompt_tokens for a in earlier), sum(a.completion_tokens for a in earlier)
        extra = UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)
        update["usage_metadata"] = add_usage(getattr(message, "usage_metadata", None), extra)
    return message.model_copy(update=update)


def release(head: list[AIMessageChunk], call: dispatch.RoutedCall) -> Iterator[ChatGenerationChunk]:
    """The chunks read while the call was decided; the first (an empty one if the model streamed
    nothing) carries the record."""
    head = head or [AIMessageChunk(content="")]
    yield ChatGenerationChunk(message=with_record(head[0], call))
    for chunk in head[1:]:
        yield ChatGenerationChunk(message=chunk)
