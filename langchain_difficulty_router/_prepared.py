"""Routing decided before LangChain's chat-model run starts, handed to ``_generate``/``_stream``.

``invoke``/``stream``/``batch`` route first, so the run's tracing parameters can name the pool
model that will serve it, and the caller's config reaches that model. The decision travels in a
context variable, not in invocation kwargs: kwargs are traced and are part of the LLM cache key,
which a per-call token would make unique.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from langchain_core.callbacks import CallbackManager
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config, get_config_list, get_executor_for_config
from langchain_core.runnables.utils import gather_with_concurrency
from pydantic import PrivateAttr

from difficulty_router.calling.dispatch import Binding
from difficulty_router.routing.session_keys import config_session_key, decide_in_session

from ._convert import to_router_query


@dataclass
class Prepared:
    """What ``invoke``/``stream``/``batch`` settle before the chat-model run starts: the decision
    (so ``_get_ls_params`` can name the model), the caller's config, and the run's parent handle."""

    owner: Any
    decision: Any = None
    config: Any = None
    parent: Any = None


PREPARED: ContextVar[Prepared | None] = ContextVar("difficulty_router_prepared", default=None)


def prepare(owner: Any, decision: Any, config: RunnableConfig | None) -> tuple[Prepared, RunnableConfig]:
    """The prepared call and the config to run with: its run id fixed so ``_stream`` (which
    ``BaseChatModel.stream`` hands no run manager) can parent its attempts' runs."""
    config = ensure_config(config)
    run_id = config.get("run_id") or uuid.uuid4()
    parent = CallbackManager.configure(
        config.get("callbacks"),
        owner.callbacks,
        owner.verbose,
        config.get("tags"),
        owner.tags,
        config.get("metadata"),
        owner.metadata,
    )
    handle = SimpleNamespace(
        run_id=run_id,
        inheritable_handlers=parent.inheritable_handlers,
        inheritable_tags=parent.inheritable_tags,
        inheritable_metadata=parent.inheritable_metadata,
    )
    return Prepared(owner, decision, config, handle), {**config, "run_id": run_id}


@contextmanager
def handed_over(prepared: Prepared) -> Iterator[None]:
    """``prepared`` is the call the chat-model run started inside this block takes."""
    token = PREPARED.set(prepared)
    try:
        yield
    finally:
        PREPARED.reset(token)


def take(owner: Any) -> Prepared | None:
    """The call ``owner`` prepared, read once (at the start of its ``_generate``/``_stream``)."""
    prepared = PREPARED.get()
    if prepared is not None and prepared.owner is owner:
        PREPARED.set(None)
        return prepared
    return None


class RoutesBeforeRun(BaseChatModel):
    """The entry points of :class:`ChatDifficultyRouter` that route before ``BaseChatModel`` starts
    the run (one extraction for a whole ``batch``), then hand over to it with the decision in
    :data:`PREPARED`."""

    _binding: Binding = PrivateAttr()

    def _exclusions(self, kwargs: dict) -> dict[str, str]:
        """Pool models a call with these kwargs (tools) must skip; the chat model says which."""
        raise NotImplementedError

    def _prepare(self, input: Any, config: Any, kwargs: dict, decision: Any = None) -> tuple[Prepared, RunnableConfig]:
        config = ensure_config(config)
        if decision is None and self._binding.routes:
            query = to_router_query(self._convert_input(input).to_messages())
            decision = decide_in_session(self._binding, query, self._exclusions(kwargs), config_session_key(config))
        return prepare(self, decision, config)

    def _take(self, messages: list[BaseMessage], kwargs: dict) -> Prepared:
        prepared = take(self)
        if prepared is None:  # called through generate(), not invoke/stream: route here
            key = config_session_key(ensure_config())
            decision = (
                decide_in_session(self._binding, to_router_query(messages), self._exclusions(kwargs), key)
                if self._binding.routes
                else None
            )
            prepared = Prepared(self, decision, {})
        return prepared

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        decision: Any = None,
        **kwargs: Any,
    ) -> AIMessage:
        prepared, config = self._prepare(input, config, kwargs, decision)
        with handed_over(prepared):
            return super().invoke(input, config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        decision: Any = None,
        **kwargs: Any,
    ) -> AIMessage:
        prepared, config = await asyncio.to_thread(self._prepare, input, config, kwargs, decision)
        with handed_over(prepared):
            return await super().ainvoke(input, config, stop=stop, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        prepared, config = self._prepare(input, config, kwargs)
        PREPARED.set(prepared)  # read by _stream on the first next(), before any other stream can run
        try:
            yield from super().stream(input, config, stop=stop, **kwargs)
        finally:
            if PREPARED.get() is prepared:
                PREPARED.set(None)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        prepared, config = await asyncio.to_thread(self._prepare, input, config, kwargs)
        PREPARED.set(prepared)
        try:
            async for chunk in super().astream(input, config, stop=stop, **kwargs):
                yield chunk
        finally:
            if PREPARED.get() is prepared:
                PREPARED.set(None)

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """One extraction for the whole batch; each call then runs with its own decision."""
        decisions, configs = self._decide_batch(inputs, kwargs), get_config_list(config, len(inputs))

        def one(i: int) -> Any:
            try:
                return self.invoke(inputs[i], configs[i], decision=decisions[i], **kwargs)
            except Exception as exc:  # noqa: BLE001 (returned, not swallowed, when return_exceptions asks)
                return _kept(exc, return_exceptions)

        with get_executor_for_config(configs[0]) as executor:
            return list(executor.map(one, range(len(inputs))))

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        decisions = await asyncio.to_thread(self._decide_batch, inputs, kwargs)
        configs = get_config_list(config, len(inputs))

        async def one(i: int) -> Any:
            try:
                return await self.ainvoke(inputs[i], configs[i], decision=decisions[i], **kwargs)
            except Exception as exc:  # noqa: BLE001 (returned, not swallowed, when return_exceptions asks)
                return _kept(exc, return_exceptions)

        return await gather_with_concurrency(configs[0].get("max_concurrency"), *(one(i) for i in range(len(inputs))))

    def _decide_batch(self, inputs: list[Any], kwargs: dict) -> list[Any]:
        if len(inputs) < 2 or not self._binding.routes or self._binding.sessions is not None:
            return [None] * len(inputs)
        try:
            queries = [to_router_query(self._convert_input(x).to_messages()) for x in inputs]
            return self._binding.decide_batch(queries, self._exclusions(kwargs))
        except (ValueError, TypeError):
            return [None] * len(inputs)  # a bad input: each call routes alone, so only that one fails


def _kept(exc: Exception, return_exceptions: bool) -> Exception:
    if return_exceptions:
        return exc
    raise exc
