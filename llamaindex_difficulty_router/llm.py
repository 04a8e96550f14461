"""DifficultyRouterLLM: one LlamaIndex LLM that hands each call to the model the router picks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection

from difficulty_router.cascade import CascadePolicy, CascadeRun, hybrid_start, pool_cost_fn
from difficulty_router.confidence import MissingLogprobsError, openai_token_logprobs
from difficulty_router.errors import is_transient_error

from ._convert import check_router, route, to_router_messages, tool_conversation
from .events import DifficultyEscalationEvent, DifficultyRouteEvent, dispatcher

if TYPE_CHECKING:
    from llama_index.core.chat_engine.types import AgentChatResponse
    from llama_index.core.tools.types import BaseTool

ROUTING_KEY = "difficulty_router"
"""Key under which each response's ``additional_kwargs`` carries the routing record."""

CASCADE_KEY = "difficulty_router_cascade"
"""Key under which a cascade response's ``additional_kwargs`` carries every rung tried (P(T), P(IK), verdicts, costs)."""

CANNOT_CALL_TOOLS = "cannot call tools"
_END = object()


def calls_tools(llm: LLM) -> bool:
    """A candidate serves tool calls only if it has the API and says its model supports it."""
    return isinstance(llm, FunctionCallingLLM) and bool(llm.metadata.is_function_calling_model)


class DifficultyRouterLLM(FunctionCallingLLM):
    """Routes every call to the cheapest candidate the router expects to answer it.

    ``llms`` maps each of the router's pool names to the LlamaIndex LLM that serves it. The
    adapter holds no routing logic: it converts the conversation, asks the router, calls the
    chosen LLM and, when that raises, the more capable ones in ``decision.fallbacks`` order.
    Each response carries the decision in ``additional_kwargs["difficulty_router"]`` (not on
    the message, which goes back into chat histories that providers serialise).

    Args:
        router: a trained ``difficulty_router.DifficultyRouter``.
        llms: ``{pool name: LLM}``, one per pool model, no others.
        escalate: on a transient error from the chosen LLM (an outage, rate limit, timeout or
            server error: ``difficulty_router.errors.is_transient_error``, the LangChain adapter's
            rule too), retry on the more capable ones. Other exceptions (a bug in the calling code
            or a tool, a rejected request) propagate from the first model without escalating.
        callback_manager: forwarded to every candidate, which emit the LLM events; this
            wrapper emits none, so token counts are not doubled.
        cascade: a ``difficulty_router.cascade.CascadePolicy``: ``chat``, ``complete`` and
            their stream and async forms answer with the cheapest ladder rung and escalate
            while its confidence is below the policy's thresholds; the core ``CascadeRun``
            decides, this class only calls the rung and records its logprobs (P(T), read
            from ``response.raw``, the OpenAI completion of OpenAI/OpenAILike LLMs built with
            ``logprobs=True``, else from ``response.logprobs``) and token usage. Every ladder
            name must be a key of ``llms``; without a router (``router=None``) the cascade
            alone decides. Streaming buffers each rung's chunks until the policy accepts that
            rung, then yields them: a rejected rung's chunks never reach the caller, so the
            first chunk arrives only after the accepted rung has finished. Each response
            carries the rungs tried in ``additional_kwargs["difficulty_router_cascade"]``.
            With ``escalate`` a transient error from a rung escalates to the next one. Tool calls
            (``*_with_tools``, ``predict_and_call``) do not cascade: they use the router.
        pik_scorers: ``{ladder model: callable(conversation) -> float}``: P(IK) for rungs with a
            local probe, called with the conversation in the core's form (a list of OpenAI
            message dicts, or the prompt string for ``complete``).
        skip_threshold: hybrid mode (needs ``router``): start at the first rung whose routing
            probability is at least this (``difficulty_router.cascade.hybrid_start``).
    """

    escalate: bool = Field(default=True, description="Retry on more capable candidates when the chosen one fails transiently.")

    _router: Any = PrivateAttr()
    _llms: Dict[str, LLM] = PrivateAttr()
    _cascade: Optional[CascadePolicy] = PrivateAttr(default=None)
    _pik_scorers: Dict[str, Callable[[Any], float]] = PrivateAttr(default_factory=dict)
    _skip_threshold: Optional[float] = PrivateAttr(default=None)

    def __init__(self, router: Any = None, llms: Optional[Mapping[str, LLM]] = None, *, escalate: bool = True,
                 cascade: Optional[CascadePolicy] = None, pik_scorers: Optional[Mapping[str, Callable]] = None,
                 skip_threshold: Optional[float] = None, callback_manager: Optional[CallbackManager] = None,
                 **kwargs: Any) -> None:
        if llms is None:
            raise TypeError("DifficultyRouterLLM needs llms={name: LLM}")
        if router is None and cascade is None:
            raise ValueError("DifficultyRouterLLM needs a router, a cascade policy, or both")
        if router is not None:
            check_router(router)
            llms = _check_llms(router, llms)
        else:
            llms = _check_llm_types(llms)
        pik_scorers = _check_cascade(cascade, llms, dict(pik_scorers or {}), skip_threshold, router)
        super().__init__(escalate=escalate, callback_manager=callback_manager, **kwargs)
        self._router = router
        self._llms = llms
        self._cascade = cascade
        self._pik_scorers = pik_scorers
        self._skip_threshold = skip_threshold
        if callback_manager is not None:
            self._forward_callback_manager(callback_manager)

    def __setattr__(self, name: str, value: Any) -> None:
        # Query engines and Settings assign callback_manager to "the LLM"; the events come from
        # the candidates, so they need it too.
        super().__setattr__(name, value)
        if name == "callback_manager":
            self._forward_callback_manager(value)

    def _forward_callback_manager(self, callback_manager: CallbackManager) -> None:
        for llm in (getattr(self, "_llms", None) or {}).values():
            llm.callback_manager = callback_manager

    @classmethod
    def class_name(cls) -> str:
        return "DifficultyRouterLLM"

    @property
    def router(self) -> Any:
        return self._router

    @property
    def llms(self) -> Dict[str, LLM]:
        return dict(self._llms)

    @property
    def cascade(self) -> Optional[CascadePolicy]:
        return self._cascade

    @property
    def metadata(self) -> LLMMetadata:
        """What every candidate can take, since any of them may get the call."""
        metas = [llm.metadata for llm in self._llms.values()]
        roles = {m.system_role for m in metas}
        return LLMMetadata(
            context_window=min(m.context_window for m in metas),
            num_output=max(m.num_output for m in metas),
            is_chat_model=all(m.is_chat_model for m in metas),
            is_function_calling_model=any(calls_tools(llm) for llm in self._llms.values()),
            model_name="difficulty-router[" + ", ".join(self._llms) + "]",
            system_role=roles.pop() if len(roles) == 1 else MessageRole.SYSTEM,
        )

    # -- routing and delegation --------------------------------------------------------
    def _tool_exclusions(self) -> Dict[str, str]:
        self._need_router("tool calls")
        exclude = {name: CANNOT_CALL_TOOLS for name, llm in self._llms.items() if not calls_tools(llm)}
        if len(exclude) == len(self._llms):
            raise ValueError(
                f"none of the candidates {list(self._llms)} can call tools (each needs to be a FunctionCallingLLM "
                "whose metadata.is_function_calling_model is true); give at least one that can"
            )
        return exclude

    def _need_router(self, operation: str) -> None:
        if self._router is None:
            raise NotImplementedError(
                f"{operation}: this DifficultyRouterLLM has a cascade and no router; the cascade serves chat, "
                "complete and their stream/async forms, and tool calls need a router")

    def _decide(self, query: Any, exclude: Optional[Dict[str, str]], operation: str):
        self._need_router(operation)
        decision = route(self._router, query, exclude)
        dispatcher.event(DifficultyRouteEvent(model=decision.model, decision=decision.to_dict(), operation=operation))
        return decision

    async def _adecide(self, query: Any, exclude: Optional[Dict[str, str]], operation: str):
        # A forward pass of the representative model; keep it off the event loop.
        self._need_router(operation)
        decision = await asyncio.to_thread(route, self._router, query, exclude)
        dispatcher.event(DifficultyRouteEvent(model=decision.model, decision=decision.to_dict(), operation=operation))
        return decision

    def _order(self, decision: Any) -> List[str]:
        return [decision.model, *decision.fallbacks] if self.escalate else [decision.model]

    def _failed(self, order: List[str], i: int, exc: Exception, failures: Dict[str, str], operation: str) -> None:
        failures[order[i]] = f"{type(exc).__name__}: {exc}"
        nxt = order[i + 1] if i + 1 < len(order) else None
        dispatcher.event(DifficultyEscalationEvent(failed_model=order[i], error=failures[order[i]],
                                                   next_model=nxt, operation=operation))
        if nxt is None:
            # Re-raise the provider's own exception so callers' handlers still match; say what was tried.
            exc.add_note(f"difficulty-router: every candidate failed ({failures})")

    @staticmethod
    def _record(decision: Any, served_by: str, failures: Dict[str, str]) -> Dict[str, Any]:
        return {**decision.to_dict(), "served_by": served_by, "escalations": dict(failures)}

    def _serve(self, decision: Any, operation: str, call: Callable[[LLM], Any]) -> Any:
        order, failures = self._order(decision), {}
        for i, name in enumerate(order):
            try:
                response = call(self._llms[name])
            except Exception as exc:
                if not is_transient_error(exc):
                    raise
                self._failed(order, i, exc, failures, operation)
                if i + 1 == len(order):
                    raise
                continue
            return _annotate(response, self._record(decision, name, failures))
        raise AssertionError("unreachable")

    async def _aserve(self, decision: Any, operation: str, call: Callable[[LLM], Any]) -> Any:
        order, failures = self._order(decision), {}
        for i, name in enumerate(order):
            try:
                response = await call(self._llms[name])
            except Exception as exc:
                if not is_transient_error(exc):
                    raise
                self._failed(order, i, exc, failures, operation)
                if i + 1 == len(order):
                    raise
                continue
            return _annotate(response, self._record(decision, name, failures))
        raise AssertionError("unreachable")

    def _serve_stream(self, decision: Any, operation: str, call: Callable[[LLM], Iterator[Any]]) -> Iterator[Any]:
        """Escalate until a candidate yields its first chunk; after that its errors are the caller's,
        since text already shown cannot be taken back."""
        order, failures = self._order(decision), {}
        for i, name in enumerate(order):
            try:
                stream = iter(call(self._llms[name]))
                first = next(stream, _END)
            except Exception as exc:
                if not is_transient_error(exc):
                    raise
                self._failed(order, i, exc, failures, operation)
                if i + 1 == len(order):
                    raise
                continue
            return _relay(first, stream, self._record(decision, name, failures))
        raise AssertionError("unreachable")

    async def _aserve_stream(self, decision: Any, operation: str, call: Callable[[LLM], Any]) -> AsyncIterator[Any]:
        order, failures = self._order(decision), {}
        for i, name in enumerate(order):
            try:
                stream = (await call(self._llms[name])).__aiter__()
                first = await anext(stream, _END)
            except Exception as exc:
                if not is_transient_error(exc):
                    raise
                self._failed(order, i, exc, failures, operation)
                if i + 1 == len(order):
                    raise
                continue
            return _arelay(first, stream, self._record(decision, name, failures))
        raise AssertionError("unreachable")

    # -- cascade: the core CascadeRun decides; these only call rungs and record replies --
    def _new_run(self, decision: Any) -> CascadeRun:
        start = hybrid_start(self._cascade, decision.probabilities, self._skip_threshold) if decision else None
        pool = getattr(self._router, "pool", None)
        return CascadeRun(self._cascade, start=start, decision=decision,
                          cost_fn=pool_cost_fn(pool) if pool is not None else None)

    def _pik(self, name: str, query: Any) -> Optional[float]:
        scorer = self._pik_scorers.get(name)
        return None if scorer is None else float(scorer(query))

    def _escalates(self, exc: Exception) -> bool:
        return self.escalate and not isinstance(exc, MissingLogprobsError) and is_transient_error(exc)

    def _rung_done(self, run: CascadeRun, name: str, attempt: Any, operation: str) -> None:
        if not attempt.accepted:
            dispatcher.event(DifficultyEscalationEvent(failed_model=name, error=attempt.reason or attempt.error or "",
                                                       next_model=run.next_model, operation=operation))

    def _cascade_serve(self, query: Any, operation: str, call: Callable[[LLM], Any], *, stream: bool = False) -> Any:
        decision = self._decide(query, None, operation) if self._skip_threshold is not None else None
        run = self._new_run(decision)
        while not run.done:
            name = run.next_model
            try:
                pik = self._pik(name, query)
                # Streams are buffered: a rung's chunks reach the caller only once the policy accepts it.
                reply = list(call(self._llms[name])) if stream else call(self._llms[name])
                attempt = run.record(name, _reply_text(reply), pik=pik, **response_signals(reply))
            except Exception as exc:
                if not self._escalates(exc):
                    raise
                attempt = run.record_failure(name, exc)  # re-raises at the top of the ladder
            self._rung_done(run, name, attempt, operation)
        return _release(reply, run) if stream else _annotate_cascade(reply, run)

    async def _acascade_serve(self, query: Any, operation: str, call: Callable[[LLM], Any], *,
                              stream: bool = False) -> Any:
        decision = await self._adecide(query, None, operation) if self._skip_threshold is not None else None
        run = self._new_run(decision)
        while not run.done:
            name = run.next_model
            try:
                pik = await asyncio.to_thread(self._pik, name, query) if name in self._pik_scorers else None
                reply = await call(self._llms[name])
                if stream:
                    reply = [chunk async for chunk in reply]
                attempt = run.record(name, _reply_text(reply), pik=pik, **response_signals(reply))
            except Exception as exc:
                if not self._escalates(exc):
                    raise
                attempt = run.record_failure(name, exc)
            self._rung_done(run, name, attempt, operation)
        return _arelease(reply, run) if stream else _annotate_cascade(reply, run)

    # -- chat and completion -----------------------------------------------------------
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self._cascade is not None:
            return self._cascade_serve(to_router_messages(messages), "chat", lambda llm: llm.chat(messages, **kwargs))
        decision = self._decide(to_router_messages(messages), None, "chat")
        return self._serve(decision, "chat", lambda llm: llm.chat(messages, **kwargs))

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if self._cascade is not None:
            return self._cascade_serve(_prompt(prompt), "complete",
                                       lambda llm: llm.complete(prompt, formatted=formatted, **kwargs))
        decision = self._decide(_prompt(prompt), None, "complete")
        return self._serve(decision, "complete", lambda llm: llm.complete(prompt, formatted=formatted, **kwargs))

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        if self._cascade is not None:
            return self._cascade_serve(to_router_messages(messages), "stream_chat",
                                       lambda llm: llm.stream_chat(messages, **kwargs), stream=True)
        decision = self._decide(to_router_messages(messages), None, "stream_chat")
        return self._serve_stream(decision, "stream_chat", lambda llm: llm.stream_chat(messages, **kwargs))

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        if self._cascade is not None:
            return self._cascade_serve(_prompt(prompt), "stream_complete",
                                       lambda llm: llm.stream_complete(prompt, formatted=formatted, **kwargs), stream=True)
        decision = self._decide(_prompt(prompt), None, "stream_complete")
        return self._serve_stream(decision, "stream_complete",
                                  lambda llm: llm.stream_complete(prompt, formatted=formatted, **kwargs))

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self._cascade is not None:
            return await self._acascade_serve(to_router_messages(messages), "achat",
                                              lambda llm: llm.achat(messages, **kwargs))
        decision = await self._adecide(to_router_messages(messages), None, "achat")
        return await self._aserve(decision, "achat", lambda llm: llm.achat(messages, **kwargs))

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if self._cascade is not None:
            return await self._acascade_serve(_prompt(prompt), "acomplete",
                                              lambda llm: llm.acomplete(prompt, formatted=formatted, **kwargs))
        decision = await self._adecide(_prompt(prompt), None, "acomplete")
        return await self._aserve(decision, "acomplete", lambda llm: llm.acomplete(prompt, formatted=formatted, **kwargs))

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        if self._cascade is not None:
            return await self._acascade_serve(to_router_messages(messages), "astream_chat",
                                              lambda llm: llm.astream_chat(messages, **kwargs), stream=True)
        decision = await self._adecide(to_router_messages(messages), None, "astream_chat")
        return await self._aserve_stream(decision, "astream_chat", lambda llm: llm.astream_chat(messages, **kwargs))

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        if self._cascade is not None:
            return await self._acascade_serve(_prompt(prompt), "astream_complete",
                                              lambda llm: llm.astream_complete(prompt, formatted=formatted, **kwargs),
                                              stream=True)
        decision = await self._adecide(_prompt(prompt), None, "astream_complete")
        return await self._aserve_stream(decision, "astream_complete",
                                         lambda llm: llm.astream_complete(prompt, formatted=formatted, **kwargs))

    # -- function calling --------------------------------------------------------------
    def _prepare_chat_with_tools(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                                 chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 **kwargs: Any) -> Dict[str, Any]:
        # Tool schemas are provider-specific, so only the chosen candidate can prepare them;
        # every *_with_tools method here routes first and hands the call over whole.
        raise NotImplementedError(
            "DifficultyRouterLLM prepares no tool calls itself; call chat_with_tools (or its async/stream forms), "
            "which route and delegate to the chosen candidate"
        )

    def _tool_kwargs(self, user_msg, chat_history, verbose, allow_parallel_tool_calls, tool_required, kwargs):
        out = dict(user_msg=user_msg, chat_history=chat_history, verbose=verbose,
                   allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs)
        if tool_required:  # older integrations do not know the argument; only pass it when asked for
            out["tool_required"] = tool_required
        return out

    def chat_with_tools(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                        chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                        allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                        **kwargs: Any) -> ChatResponse:
        query = to_router_messages(tool_conversation(user_msg, chat_history), "user_msg and chat_history")
        decision = self._decide(query, self._tool_exclusions(), "chat_with_tools")
        kw = self._tool_kwargs(user_msg, chat_history, verbose, allow_parallel_tool_calls, tool_required, kwargs)
        return self._serve(decision, "chat_with_tools", lambda llm: llm.chat_with_tools(tools, **kw))

    async def achat_with_tools(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                               chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                               allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                               **kwargs: Any) -> ChatResponse:
        query = to_router_messages(tool_conversation(user_msg, chat_history), "user_msg and chat_history")
        decision = await self._adecide(query, self._tool_exclusions(), "achat_with_tools")
        kw = self._tool_kwargs(user_msg, chat_history, verbose, allow_parallel_tool_calls, tool_required, kwargs)
        return await self._aserve(decision, "achat_with_tools", lambda llm: llm.achat_with_tools(tools, **kw))

    def stream_chat_with_tools(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                               chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                               allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                               **kwargs: Any) -> ChatResponseGen:
        query = to_router_messages(tool_conversation(user_msg, chat_history), "user_msg and chat_history")
        decision = self._decide(query, self._tool_exclusions(), "stream_chat_with_tools")
        kw = self._tool_kwargs(user_msg, chat_history, verbose, allow_parallel_tool_calls, tool_required, kwargs)
        return self._serve_stream(decision, "stream_chat_with_tools", lambda llm: llm.stream_chat_with_tools(tools, **kw))

    async def astream_chat_with_tools(self, tools: Sequence["BaseTool"],
                                      user_msg: Optional[Union[str, ChatMessage]] = None,
                                      chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                                      allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                      **kwargs: Any) -> ChatResponseAsyncGen:
        query = to_router_messages(tool_conversation(user_msg, chat_history), "user_msg and chat_history")
        decision = await self._adecide(query, self._tool_exclusions(), "astream_chat_with_tools")
        kw = self._tool_kwargs(user_msg, chat_history, verbose, allow_parallel_tool_calls, tool_required, kwargs)
        return await self._aserve_stream(decision, "astream_chat_with_tools",
                                         lambda llm: llm.astream_chat_with_tools(tools, **kw))

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> List[ToolSelection]:
        """Parsing tool calls is provider-specific, so the candidate that answered parses them."""
        record = response.additional_kwargs.get(ROUTING_KEY)
        if record is None:
            if not error_on_no_tool_call and not response.message.blocks and not response.message.additional_kwargs:
                return []  # agents probe an empty placeholder response when a stream yields nothing
            raise ValueError(
                f"this response has no additional_kwargs[{ROUTING_KEY!r}], so it did not come from this "
                "DifficultyRouterLLM and there is no telling which candidate's format its tool calls are in"
            )
        llm = self._llms.get(record.get("served_by"))
        if not isinstance(llm, FunctionCallingLLM):
            raise ValueError(f"the response was served by {record.get('served_by')!r}, which is not a function-calling "
                             f"candidate of this DifficultyRouterLLM ({list(self._llms)})")
        return llm.get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call, **kwargs)

    def _predict_and_call_exclusions(self) -> Optional[Dict[str, str]]:
        # Without any function-calling candidate every candidate takes the ReAct path of LLM.predict_and_call.
        return self._tool_exclusions() if self.metadata.is_function_calling_model else None

    def predict_and_call(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                         chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                         allow_parallel_tool_calls: bool = False, error_on_no_tool_call: bool = True,
                         error_on_tool_error: bool = False, **kwargs: Any) -> "AgentChatResponse":
        query = to_router_messages(tool_conversation(user_msg, chat_history), "user_msg and chat_history")
        decision = self._decide(query, self._predict_and_call_exclusions(), "predict_and_call")
        return self._serve(decision, "predict_and_call", lambda llm: llm.predict_and_call(
            tools, user_msg=user_msg, chat_history=chat_history, verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls, error_on_no_tool_call=error_on_no_tool_call,
            error_on_tool_error=error_on_tool_error, **kwargs))

    async def apredict_and_call(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                                chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                                allow_parallel_tool_calls: bool = False, error_on_no_tool_call: bool = True,
                                error_on_tool_error: bool = False, **kwargs: Any) -> "AgentChatResponse":
        query = to_router_messages(tool_conversation(user_msg, chat_history), "user_msg and chat_history")
        decision = await self._adecide(query, self._predict_and_call_exclusions(), "apredict_and_call")
        return await self._aserve(decision, "apredict_and_call", lambda llm: llm.apredict_and_call(
            tools, user_msg=user_msg, chat_history=chat_history, verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls, error_on_no_tool_call=error_on_no_tool_call,
            error_on_tool_error=error_on_tool_error, **kwargs))


# The public entry points that BaseLLM does not declare abstract get spans explicitly, so the
# route event and the candidate's LLM events nest under one span per call.
for _name in ("chat_with_tools", "achat_with_tools", "stream_chat_with_tools", "astream_chat_with_tools",
              "predict_and_call", "apredict_and_call", "get_tool_calls_from_response"):
    setattr(DifficultyRouterLLM, _name, dispatcher.span(getattr(DifficultyRouterLLM, _name)))


def _prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt


def _annotate(response: Any, record: Dict[str, Any]) -> Any:
    if isinstance(response, (ChatResponse, CompletionResponse)):
        response.additional_kwargs[ROUTING_KEY] = record
    elif hasattr(response, "metadata"):  # AgentChatResponse from predict_and_call
        response.metadata = {**(response.metadata or {}), ROUTING_KEY: record}
    return response


def _relay(first: Any, stream: Iterator[Any], record: Dict[str, Any]) -> Iterator[Any]:
    if first is _END:
        return
    yield _annotate(first, record)
    for chunk in stream:
        yield _annotate(chunk, record)


async def _arelay(first: Any, stream: AsyncIterator[Any], record: Dict[str, Any]) -> AsyncIterator[Any]:
    if first is _END:
        return
    yield _annotate(first, record)
    async for chunk in stream:
        yield _annotate(chunk, record)


def response_signals(reply: Any) -> Dict[str, Any]:
    """A rung's reply (one response, or a stream's chunks) -> answer tokens, their logprobs, token usage.

    Logprobs come from ``raw`` (the OpenAI completion or stream chunk for OpenAI/OpenAILike
    LLMs), else from ``response.logprobs`` (LlamaIndex's per-position alternatives; the most
    likely one is taken, which is the generated token under greedy decoding). Missing: None.
    """
    parts = reply if isinstance(reply, list) else [reply]
    tokens: List[str] = []
    values: List[float] = []
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
    return {"tokens": tokens or None, "logprobs": values or None, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens}


def _part_logprobs(part: Any) -> Optional[tuple]:
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


def _reply_text(reply: Any) -> str:
    if isinstance(reply, list):  # a stream: the last chunk holds the whole text
        if not reply:
            return ""
        reply = reply[-1]
    if isinstance(reply, ChatResponse):
        return reply.message.content or ""
    return getattr(reply, "text", "") or ""


def _cascade_record(run: CascadeRun) -> Dict[str, Any]:
    served = run.result().model
    return {**(run.decision.to_dict() if run.decision is not None else {}), "mode": "cascade", "start": run.start,
            "served_by": served, "escalations": {a.model: a.error or a.reason for a in run.attempts if not a.accepted}}


def _annotate_cascade(response: Any, run: CascadeRun, record: Optional[Dict[str, Any]] = None,
                      cascade: Optional[Dict[str, Any]] = None) -> Any:
    response = _annotate(response, record or _cascade_record(run))
    response.additional_kwargs[CASCADE_KEY] = cascade or run.metadata()["cascade"]
    return response


def _release(chunks: List[Any], run: CascadeRun) -> Iterator[Any]:
    record, cascade = _cascade_record(run), run.metadata()["cascade"]
    for chunk in chunks:
        yield _annotate_cascade(chunk, run, record, cascade)


async def _arelease(chunks: List[Any], run: CascadeRun) -> AsyncIterator[Any]:
    record, cascade = _cascade_record(run), run.metadata()["cascade"]
    for chunk in chunks:
        yield _annotate_cascade(chunk, run, record, cascade)


def _check_cascade(cascade: Any, llms: Dict[str, LLM], pik_scorers: Dict[str, Any], skip_threshold: Any,
                   router: Any) -> Dict[str, Any]:
    if cascade is None:
        if pik_scorers or skip_threshold is not None:
            raise ValueError("pik_scorers= and skip_threshold= only apply with cascade=")
        return {}
    if not isinstance(cascade, CascadePolicy):
        raise TypeError(f"cascade must be a difficulty_router.cascade.CascadePolicy, got {type(cascade).__name__}")
    ladder = list(cascade.ladder)
    missing = [m for m in ladder if m not in llms]
    if missing:
        raise ValueError(f"the cascade ladder names {missing}, which are not among the configured llms "
                         f"{list(llms)}; give llms= an LLM for every rung")
    unknown = sorted(set(pik_scorers) - set(ladder))
    if unknown:
        raise ValueError(f"pik_scorers= names {unknown}, which are not on the cascade ladder {ladder}")
    for name, scorer in pik_scorers.items():
        if not callable(scorer):
            raise TypeError(f"pik_scorers[{name!r}] must be callable(conversation) -> float")
    if cascade.needs_pik:
        lacking = [m for m in ladder[:-1] if m not in pik_scorers]
        if lacking:
            raise ValueError(f"the cascade policy uses P(IK) but rungs {lacking} have no pik_scorers= entry")
    if skip_threshold is not None:
        if router is None:
            raise ValueError("skip_threshold= (hybrid mode) needs a router to read the start rung from")
        if isinstance(skip_threshold, bool) or not 0 <= skip_threshold <= 1:
            raise ValueError(f"skip_threshold must be in [0, 1], got {skip_threshold!r}")
    return pik_scorers


def _check_llm_types(llms: Any) -> Dict[str, LLM]:
    if not isinstance(llms, Mapping) or not llms:
        raise TypeError(f"llms must be a non-empty mapping {{name: LLM}}, got {llms!r}")
    for name, llm in llms.items():
        if not isinstance(llm, LLM):
            raise TypeError(f"llms[{name!r}] must be a llama_index LLM, got {type(llm).__name__}")
    return dict(llms)


def _check_llms(router: Any, llms: Any) -> Dict[str, LLM]:
    if not isinstance(llms, Mapping):
        raise TypeError(f"llms must be a mapping {{pool name: LLM}}, got {type(llms).__name__}")
    pool = list(router.models)
    unknown = [name for name in llms if name not in pool]
    if unknown:
        raise ValueError(f"llms names {unknown}, which are not in the router's pool {pool}")
    missing = [name for name in pool if name not in llms]
    if missing:
        raise ValueError(f"llms has no LLM for the pool models {missing}; the router may pick any of {pool}")
    for name, llm in llms.items():
        if not isinstance(llm, LLM):
            raise TypeError(f"llms[{name!r}] must be a llama_index LLM, got {type(llm).__name__}")
    return {name: llms[name] for name in pool}
