"""DifficultyRouterLLM: one LlamaIndex LLM that hands each call to the model the router picks.

Framework conversion, calling a candidate and instrumentation only: the walk up the ladder
(plain routing with fallbacks, or a confidence cascade), the escalation rule, retries and the
record are the core's :mod:`difficulty_router.calling.dispatch`, shared with LangChain and the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection

from difficulty_router.calling.dispatch import CANNOT_CALL_TOOLS, RECORD_KEY, Binding, Retry
from difficulty_router.routing.session_keys import as_sessions
from difficulty_router.routing.sessions import check_key

from ._convert import to_router_messages, tool_conversation
from ._serving import CURRENT_SESSION, RoutedCalls, calls_tools
from .events import dispatcher

if TYPE_CHECKING:
    from llama_index.core.chat_engine.types import AgentChatResponse
    from llama_index.core.tools.types import BaseTool

ROUTING_KEY = RECORD_KEY
"""Key under which each response's ``additional_kwargs`` carries the routing record."""

__all__ = ["CANNOT_CALL_TOOLS", "ROUTING_KEY", "DifficultyRouterLLM", "calls_tools"]


class DifficultyRouterLLM(RoutedCalls):
    """Routes every call to the cheapest candidate the router expects to answer it.

    Args:
        router: a trained ``difficulty_router.DifficultyRouter`` (optional with ``cascade``).
        llms: ``{pool name: LLM}``, one per pool model, no others.
        escalate / escalate_on: on an error the rule accepts (default: transient ones, an outage,
            rate limit, timeout or server error), move on to the more capable candidates;
            ``escalate=False`` never does (the error reaches the caller, recorded and noted).
            Other errors propagate from the first model.
        max_retries / retry_backoff: extra tries of the same candidate before escalating.
        cascade / pik_scorers / skip_threshold: answer with the cheapest ladder rung and escalate
            while its confidence is low (P(T) from ``response.raw`` logprobs or ``response.logprobs``,
            P(IK) from the scorers); streams are then buffered until a rung is accepted. Tool
            calls route; they do not cascade.
        sessions: a ``difficulty_router.routing.sessions.Sessions`` or a policy name ("per_call", "sticky",
            "cache_aware"). Each call then belongs to a session: the key set with :meth:`session`
            (``with llm.session("user-42"): ...``), else a key derived from the conversation's opening
            (its system messages and first user message), which every step of a ``FunctionAgent`` /
            ``AgentWorkflow`` run, and every later turn on the same chat history, shares.
        shadow / shadow_sample / decision_log: shadow mode. Every call is served by the candidate
            ``shadow`` while the router still decides; the record's ``shadow`` part (and the
            ``difficulty_router.DecisionLog``, when given) keeps its would-be choice. A ``shadow_sample``
            share of calls is also sent to the would-be candidate (not streams), its answer recorded as a label.
        stream_holdback: a ``difficulty_router.StreamHoldback``: hold each routed stream's first chunks
            (or milliseconds) back, so a candidate whose stream breaks meanwhile escalates unseen.
            Default: commit at the first chunk.

    Each response carries :meth:`RoutedCall.record` in ``additional_kwargs["difficulty_router"]``
    (not on the message, which goes back into chat histories). A ``callback_manager`` set here
    reaches the candidates through copies; the user's own LLM objects are never modified.
    """

    def __init__(
        self,
        router: Any = None,
        llms: Mapping[str, LLM] | None = None,
        *,
        escalate: bool = True,
        escalate_on: Any = None,
        max_retries: int = 0,
        retry_backoff: float = 0.0,
        cascade: Any = None,
        pik_scorers: Mapping[str, Callable] | None = None,
        skip_threshold: float | None = None,
        sessions: Any = None,
        shadow: str | None = None,
        shadow_sample: float = 0.0,
        decision_log: Any = None,
        stream_holdback: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(llms, Mapping) or not llms:
            raise TypeError(f"llms must be a mapping {{pool name: LLM}}, got {type(llms).__name__}")
        for name, llm in llms.items():
            if not isinstance(llm, LLM):
                raise TypeError(f"llms[{name!r}] must be a llama_index LLM, got {type(llm).__name__}")
        binding = Binding(
            llms,
            router=router,
            cascade=cascade,
            pik_scorers=pik_scorers,
            skip_threshold=skip_threshold,
            escalate_on=escalate_on,
            retry=Retry(max_retries, retry_backoff),
            fallbacks=escalate,
            what="llms",
            sessions=as_sessions(sessions),
            shadow=shadow,
            shadow_sample=shadow_sample,
            decision_log=decision_log,
            stream_holdback=stream_holdback,
        )
        super().__init__(escalate=escalate, **kwargs)
        self._binding = binding
        self._llms = {name: llms[name] for name in (router.models if router is not None else llms)}

    @classmethod
    def class_name(cls) -> str:
        return "DifficultyRouterLLM"

    @contextmanager
    def session(self, key: str) -> Iterator[None]:
        """Calls made inside (sync, or async tasks started inside) belong to session ``key``."""
        if self._binding.sessions is None:
            raise ValueError("this DifficultyRouterLLM has no sessions=; give sessions='sticky' (or a Sessions)")
        token = CURRENT_SESSION.set(check_key(key))
        try:
            yield
        finally:
            CURRENT_SESSION.reset(token)

    @property
    def sessions(self) -> Any:
        return self._binding.sessions

    @property
    def router(self) -> Any:
        return self._binding.router

    @property
    def cascade(self) -> Any:
        return self._binding.cascade

    @property
    def llms(self) -> dict[str, LLM]:
        return dict(self._llms)

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

    # -- chat and completion ---------------------------------------------------------------
    @dispatcher.span
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._serve(to_router_messages(messages), "chat", lambda llm: llm.chat(messages, **kwargs))

    @dispatcher.span
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._serve(_prompt(prompt), "complete", lambda llm: llm.complete(prompt, formatted=formatted, **kwargs))

    @dispatcher.span
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._serve_stream(
            to_router_messages(messages), "stream_chat", lambda llm: llm.stream_chat(messages, **kwargs)
        )

    @dispatcher.span
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._serve_stream(
            _prompt(prompt),
            "stream_complete",
            lambda llm: llm.stream_complete(prompt, formatted=formatted, **kwargs),
            chat=False,
        )

    @dispatcher.span
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._aserve(to_router_messages(messages), "achat", lambda llm: llm.achat(messages, **kwargs))

    @dispatcher.span
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await self._aserve(
            _prompt(prompt), "acomplete", lambda llm: llm.acomplete(prompt, formatted=formatted, **kwargs)
        )

    @dispatcher.span
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._aserve_stream(
            to_router_messages(messages), "astream_chat", lambda llm: llm.astream_chat(messages, **kwargs)
        )

    @dispatcher.span
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return await self._aserve_stream(
            _prompt(prompt),
            "astream_complete",
            lambda llm: llm.astream_complete(prompt, formatted=formatted, **kwargs),
            chat=False,
        )

    # -- function calling: routed (never cascaded) and handed to the chosen candidate whole ----
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: Any = None,
        chat_history: Any = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        raise NotImplementedError(
            "DifficultyRouterLLM prepares no tool calls itself (tool schemas are provider-"
            "specific); call chat_with_tools or its async/stream forms, which route and delegate"
        )

    def _tools(
        self, method: str, tools: Sequence[BaseTool], user_msg: Any, chat_history: Any, **kw: Any
    ) -> tuple[Any, str, Callable[[LLM], Any]]:
        if not kw.get("tool_required"):  # older integrations do not know the argument; pass it only when asked for
            kw.pop("tool_required", None)
        query = to_router_messages(tool_conversation(user_msg, chat_history), "user_msg and chat_history")
        return (
            query,
            method,
            lambda llm: getattr(llm, method)(tools, user_msg=user_msg, chat_history=chat_history, **kw),
        )

    @dispatcher.span
    def chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        **kw: Any,
    ) -> ChatResponse:
        return self._serve(*self._tools("chat_with_tools", tools, user_msg, chat_history, **kw), tools=True)

    @dispatcher.span
    async def achat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        **kw: Any,
    ) -> ChatResponse:
        return await self._aserve(*self._tools("achat_with_tools", tools, user_msg, chat_history, **kw), tools=True)

    @dispatcher.span
    def stream_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        **kw: Any,
    ) -> ChatResponseGen:
        return self._serve_stream(
            *self._tools("stream_chat_with_tools", tools, user_msg, chat_history, **kw), tools=True
        )

    @dispatcher.span
    async def astream_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        **kw: Any,
    ) -> ChatResponseAsyncGen:
        return await self._aserve_stream(
            *self._tools("astream_chat_with_tools", tools, user_msg, chat_history, **kw), tools=True
        )

    @dispatcher.span
    def predict_and_call(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        **kw: Any,
    ) -> AgentChatResponse:
        return self._serve(*self._tools("predict_and_call", tools, user_msg, chat_history, **kw), tools=True)

    @dispatcher.span
    async def apredict_and_call(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        **kw: Any,
    ) -> AgentChatResponse:
        return await self._aserve(*self._tools("apredict_and_call", tools, user_msg, chat_history, **kw), tools=True)

    @dispatcher.span
    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
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
            raise ValueError(
                f"the response was served by {record.get('served_by')!r}, which is not a function-calling "
                f"candidate of this DifficultyRouterLLM ({list(self._llms)})"
            )
        return llm.get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call, **kwargs)


def _prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt
