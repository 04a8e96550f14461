"""What every routed call of :class:`DifficultyRouterLLM` does, in one place: route (or not),
start a :class:`~difficulty_router.calling.dispatch.RoutedCall`, let the core walk it while this calls
the candidate it names, and attach the record to what comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM

from difficulty_router.calling import dispatch
from difficulty_router.calling.dispatch import Binding
from difficulty_router.routing.session_keys import conversation_key, decide_in_session

from ._replies import EscalationEvents, annotate, empty_like, response_reply, stream_reply
from .events import DifficultyRouteEvent, dispatcher

CURRENT_SESSION: ContextVar[str | None] = ContextVar("difficulty_router_session", default=None)
"""The session key set by :meth:`DifficultyRouterLLM.session` for the calls made inside it."""


def calls_tools(llm: LLM) -> bool:
    """A candidate serves tool calls only if it has the API and says its model supports it."""
    return isinstance(llm, FunctionCallingLLM) and bool(llm.metadata.is_function_calling_model)


class RoutedCalls(FunctionCallingLLM):
    """The candidates (``_llms``), the core binding, and the four ways to serve a call
    (sync/async, whole/streamed); :class:`DifficultyRouterLLM` adds the public API."""

    escalate: bool = Field(default=True, description="Retry on more capable candidates when the chosen one fails.")

    _llms: dict[str, LLM] = PrivateAttr()
    _binding: Binding = PrivateAttr()
    _with_callbacks: dict[str, LLM] = PrivateAttr(default_factory=dict)

    def _candidate(self, name: str) -> LLM:
        """The candidate, or a copy of it wired to this LLM's callback manager (query engines and
        Settings hand theirs to "the LLM"; the candidates emit the LLM events, so they need it)."""
        llm, manager = self._llms[name], self.callback_manager
        if not manager.handlers or llm.callback_manager is manager:
            return llm
        copy = self._with_callbacks.get(name)
        if copy is None or copy.callback_manager is not manager:
            copy = self._with_callbacks[name] = llm.model_copy(update={"callback_manager": manager})
        return copy

    # -- one routed call -------------------------------------------------------------------
    def _decide(self, query: Any, exclude: dict[str, str] | None) -> Any:
        """The router's decision, for the call's session when the LLM has ``sessions=``: the key set
        with :meth:`DifficultyRouterLLM.session`, else one derived from the conversation's opening."""
        key = None
        if self._binding.sessions is not None:
            key = CURRENT_SESSION.get() or conversation_key(query)
        return decide_in_session(self._binding, query, exclude, key)

    def _start(self, query: Any, operation: str, decision: Any, tools: bool) -> dispatch.RoutedCall:
        if decision is not None:
            dispatcher.event(
                DifficultyRouteEvent(model=decision.model, decision=decision.to_dict(), operation=operation)
            )
        return self._binding.start(decision, query=query, cascade=not tools)

    def _routing(self, operation: str, tools: bool) -> tuple[bool, dict[str, str] | None]:
        if tools and self._binding.router is None:
            raise NotImplementedError(
                f"{operation}: this DifficultyRouterLLM has a cascade and no router; tool "
                "calls need a router (the cascade serves chat, complete and their forms)"
            )
        exclude = None
        if tools and self.metadata.is_function_calling_model:
            exclude = self._binding.tool_exclusions({n: calls_tools(llm) for n, llm in self._llms.items()})
        elif tools and operation.endswith("with_tools"):
            self._binding.tool_exclusions({})  # refuses: no candidate calls tools
        return tools or self._binding.routes, exclude

    def _serve(self, query: Any, operation: str, fn: Callable[[LLM], Any], *, tools: bool = False) -> Any:
        needed, exclude = self._routing(operation, tools)
        call = self._start(query, operation, self._decide(query, exclude) if needed else None, tools)
        reply = dispatch.run_sync(call, lambda n: response_reply(fn(self._candidate(n))), EscalationEvents(operation))
        return annotate(reply.value, call.record())

    async def _aserve(self, query: Any, operation: str, fn: Callable[[LLM], Any], *, tools: bool = False) -> Any:
        needed, exclude = self._routing(operation, tools)
        # The routing forward pass runs off the event loop.
        decision = await asyncio.to_thread(self._decide, query, exclude) if needed else None
        call = self._start(query, operation, decision, tools)

        async def invoke(name: str) -> dispatch.Reply:
            return response_reply(await fn(self._candidate(name)))

        reply = await dispatch.run_async(call, invoke, EscalationEvents(operation))
        return annotate(reply.value, call.record())

    def _serve_stream(
        self, query: Any, operation: str, fn: Callable[[LLM], Any], *, tools: bool = False, chat: bool = True
    ) -> Any:
        needed, exclude = self._routing(operation, tools)
        call = self._start(query, operation, self._decide(query, exclude) if needed else None, tools)
        opened = dispatch.stream_sync(call, lambda n: fn(self._candidate(n)), stream_reply, EscalationEvents(operation))

        def relay() -> Iterator[Any]:
            record = call.record()
            for chunk in opened.head or [empty_like(chat)]:
                yield annotate(chunk, record)
            for chunk in opened.tail:
                yield annotate(chunk, record)

        return relay()

    async def _aserve_stream(
        self, query: Any, operation: str, fn: Callable[[LLM], Any], *, tools: bool = False, chat: bool = True
    ) -> Any:
        needed, exclude = self._routing(operation, tools)
        decision = await asyncio.to_thread(self._decide, query, exclude) if needed else None
        call = self._start(query, operation, decision, tools)
        opened = await dispatch.stream_async(
            call, lambda n: fn(self._candidate(n)), stream_reply, EscalationEvents(operation)
        )

        async def relay() -> AsyncIterator[Any]:
            record = call.record()
            for chunk in opened.head or [empty_like(chat)]:
                yield annotate(chunk, record)
            async for chunk in opened.tail:
                yield annotate(chunk, record)

        return relay()
