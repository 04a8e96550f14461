"""``DifficultyRouterMiddleware``: an agent middleware for ``langchain.agents.create_agent`` that
routes every model call of the agent, under a session policy.

``ModelRouterMiddleware`` with :class:`~langchain_difficulty_router.DifficultyDecisionModel`
classifies once per agent run; this middleware decides each model call on the conversation so
far (system prompt, messages, tool calls and results), for agents whose later steps differ from
the first. Each call's decision goes through the core's :class:`~difficulty_router.calling.dispatch.Binding`
(the session policy, escalation on transient errors, retries) and the served model's message
carries the routing record under ``response_metadata["difficulty_router"]``, as
:class:`~langchain_difficulty_router.ChatDifficultyRouter`'s messages do.

The session key is ``session_id=`` when given, else the run's ``configurable`` ``session_id``,
else its ``thread_id``; a run with none of them routes per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from langchain.agents.middleware.types import AgentMiddleware, ExtendedModelResponse, ModelRequest, ModelResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables.config import ensure_config

from difficulty_router.calling import dispatch
from difficulty_router.calling.dispatch import Binding, Reply, Retry
from difficulty_router.routing.session_keys import as_sessions, config_session_key, decide_in_session

from ._convert import to_router_query
from ._pool import tool_capability
from ._tracing import message_reply, with_record


class DifficultyRouterMiddleware(AgentMiddleware):
    """Routes each model call of a ``create_agent`` agent to a pool chat model.

    Args:
        router: a trained ``difficulty_router.DifficultyRouter``.
        models: ``{pool model name: chat model}``, covering the router's pool exactly. The agent's
            own ``model`` is never called (give any of these to ``create_agent``).
        sessions: a ``difficulty_router.routing.sessions.Sessions`` or a policy name ("per_call", "sticky",
            "cache_aware"); default: per call.
        session_id: a fixed session key for every run of the agent (default: from the run's config).
        tool_calling: ``{name: bool}`` overrides for whether a pool model can call tools.
        escalate_on / max_retries / retry_backoff: as for ``ChatDifficultyRouter``.
        shadow / shadow_sample / decision_log: shadow mode, as for ``ChatDifficultyRouter``.
    """

    def __init__(
        self,
        router: Any,
        models: Mapping[str, BaseChatModel],
        *,
        sessions: Any = None,
        session_id: str | None = None,
        tool_calling: Mapping[str, bool] | None = None,
        escalate_on: Any = None,
        max_retries: int = 0,
        retry_backoff: float = 0.0,
        shadow: str | None = None,
        shadow_sample: float = 0.0,
        decision_log: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(models, Mapping) or not models:
            raise TypeError(f"models must be a mapping {{pool model: chat model}}, got {type(models).__name__}")
        for name, model in models.items():
            if not isinstance(model, BaseChatModel):
                raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not a LangChain chat model")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        self.models = dict(models)
        self.sessions = as_sessions(sessions)
        self.session_id = session_id
        self.binding = Binding(
            self.models,
            router=router,
            escalate_on=escalate_on,
            retry=Retry(max_retries, retry_backoff),
            sessions=self.sessions,
            shadow=shadow,
            shadow_sample=shadow_sample,
            decision_log=decision_log,
        )
        self.tool_calling = dict(tool_calling or {})
        tool_capability(self.models, self.tool_calling)  # checks the overrides name pool models

    # -- the decision for one model call ------------------------------------------------------
    def _start(self, request: ModelRequest) -> dispatch.RoutedCall:
        messages = [request.system_message, *request.messages] if request.system_message else request.messages
        query = to_router_query(messages)
        exclude = None
        if request.tools:
            exclude = self.binding.tool_exclusions(tool_capability(self.models, self.tool_calling))
        key = self.session_id or config_session_key(ensure_config())
        decision = decide_in_session(self.binding, query, exclude, key)
        return self.binding.start(decision, query=query, cascade=False)

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Any]
    ) -> ModelResponse | ExtendedModelResponse:
        call = self._start(request)

        def invoke(name: str) -> Reply:
            return _reply(handler(request.override(model=self.models[name])))

        return _with_record(dispatch.run_sync(call, invoke).value, call)

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[Any]]
    ) -> ModelResponse | ExtendedModelResponse:
        call = await asyncio.to_thread(self._start, request)  # the routing forward pass runs off the event loop

        async def invoke(name: str) -> Reply:
            return _reply(await handler(request.override(model=self.models[name])))

        return _with_record((await dispatch.run_async(call, invoke)).value, call)


def _response(value: Any) -> ModelResponse:
    """The ``ModelResponse`` inside what a handler returned (a bare message, or an extended response)."""
    if isinstance(value, ExtendedModelResponse):
        return value.model_response
    if isinstance(value, AIMessage):
        return ModelResponse(result=[value])
    if isinstance(value, ModelResponse):
        return value
    raise TypeError(f"a model call handler returned a {type(value).__name__}, not a ModelResponse")


def _answer(response: ModelResponse) -> int:
    """Index of the model's own message in the response (structured output may add a ToolMessage)."""
    for i in range(len(response.result) - 1, -1, -1):
        if isinstance(response.result[i], AIMessage):
            return i
    raise ValueError("the model call's response has no AIMessage to carry the routing record")


def _reply(value: Any) -> Reply:
    response = _response(value)
    reply = message_reply(response.result[_answer(response)])
    reply.value = value
    return reply


def _with_record(value: Any, call: dispatch.RoutedCall) -> ModelResponse | ExtendedModelResponse:
    response = _response(value)
    i = _answer(response)
    result = list(response.result)
    result[i] = with_record(result[i], call)
    routed = ModelResponse(result=result, structured_response=response.structured_response)
    if isinstance(value, ExtendedModelResponse):
        return ExtendedModelResponse(model_response=routed, command=value.command)
    return routed
