"""``ChatDifficultyRouter``: a LangChain chat model that hands each call to the pool model the router picks.

Framework conversion, calling the pool model and tracing only: the walk up the ladder (plain
routing with fallbacks, or a confidence cascade), the escalation rule, retries and the record
under ``response_metadata["difficulty_router"]`` are the core's :mod:`difficulty_router.calling.dispatch`,
shared with the LlamaIndex adapter and the server.

Callbacks see the router's own chat-model run plus one child chain run per attempt, named
after and tagged with the pool model tried. The pool model runs with the caller's config
(tags, metadata, ``configurable``, run name) but without its callbacks: otherwise every token
and usage record would be reported twice.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, model_validator

from difficulty_router.calling import dispatch
from difficulty_router.calling.dispatch import RECORD_KEY, Binding, Reply, Retry
from difficulty_router.routing.session_keys import as_sessions

from ._convert import to_router_query
from ._pool import merged_profile, pool_config, tool_capability
from ._prepared import PREPARED, Prepared, RoutesBeforeRun
from ._structured import routed_structured_output
from ._tracing import AttemptRuns, join_chunks, message_reply, release, with_record

META_KEY = RECORD_KEY


class ChatDifficultyRouter(RoutesBeforeRun):
    """Routes each call to the cheapest pool chat model the router expects to answer it.

    Args:
        router: a trained ``difficulty_router.DifficultyRouter`` (optional with ``cascade``).
        models: ``{pool model name: chat model}``; must cover the router's pool exactly.
        tool_calling: ``{name: bool}`` overrides for whether a pool model can call tools
            (by default: it implements ``bind_tools`` and its profile does not deny it).
        escalate_on: exception types, or a predicate on the exception, that move the call on to
            the next more capable model; default ``difficulty_router.core.errors.is_transient_error``.
        max_retries / retry_backoff: extra tries of the same model on such an error before
            escalating, waiting ``retry_backoff * 2**k`` seconds.
        stop: default stop sequences passed to the chosen model.
        cascade: a ``CascadePolicy``: answer with the cheapest ladder rung and escalate while its
            confidence (P(T) from logprobs, P(IK) from ``pik_scorers``) is below the thresholds.
            Streaming then buffers each rung until it is accepted.
        pik_scorers: ``{ladder model: callable(conversation) -> float}`` (conversation as OpenAI dicts).
        skip_threshold: hybrid mode: start at the first rung whose routing probability is at least this.
        sessions: a ``difficulty_router.routing.sessions.Sessions`` or a policy name ("per_call", "sticky",
            "cache_aware"): calls whose config names a session (``configurable`` ``session_id``, else
            ``thread_id``, as ``create_agent`` runs with a checkpointer have) are decided for that session.
            ``batch`` then routes each call on its own (one session turn each) instead of in one extraction.
        shadow / shadow_sample / decision_log: shadow mode. Every call is served by the pool model
            ``shadow`` while the router still decides; the record's ``shadow`` part (and the
            ``difficulty_router.DecisionLog``, when given) keeps its would-be choice. A ``shadow_sample``
            share of calls is also sent to the would-be model (not streams), its answer recorded as a label.
        stream_holdback: a ``difficulty_router.StreamHoldback``: hold each routed stream's first chunks
            (or milliseconds) back, so a pool model whose stream breaks meanwhile escalates unseen.
            Default: commit at the first chunk.
    """

    router: Any = Field(default=None, exclude=True)
    models: dict[str, Any]
    cascade: Any = Field(default=None, exclude=True)
    pik_scorers: dict[str, Any] = Field(default_factory=dict, exclude=True)
    skip_threshold: float | None = None
    tool_calling: dict[str, bool] = Field(default_factory=dict)
    escalate_on: Any = None
    max_retries: int = 0
    retry_backoff: float = 0.0
    stop: list[str] | None = None
    streaming: bool = False
    sessions: Any = Field(default=None, exclude=True)
    shadow: str | None = None
    shadow_sample: float = 0.0
    decision_log: Any = Field(default=None, exclude=True)
    stream_holdback: Any = Field(default=None, exclude=True)

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _bind(self) -> ChatDifficultyRouter:
        if self.router is not None and not hasattr(self.router, "route_batch"):
            raise TypeError(f"router must be a difficulty_router.DifficultyRouter, got {type(self.router).__name__}")
        for name, model in self.models.items():
            if not isinstance(model, Runnable):
                raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not a LangChain chat model")
        self._binding = Binding(
            self.models,
            router=self.router,
            cascade=self.cascade,
            pik_scorers=self.pik_scorers,
            skip_threshold=self.skip_threshold,
            escalate_on=self.escalate_on,
            retry=Retry(self.max_retries, self.retry_backoff),
            sessions=as_sessions(self.sessions),
            shadow=self.shadow,
            shadow_sample=self.shadow_sample,
            decision_log=self.decision_log,
            stream_holdback=self.stream_holdback,
        )
        tool_capability(self.models, self.tool_calling)  # checks the overrides name pool models
        if self.profile is None:
            self.profile = merged_profile([getattr(m, "profile", None) for m in self.models.values()])
        return self

    @classmethod
    def from_router_dir(
        cls, path: str | os.PathLike, models: dict[str, Any], *, extractor: Any = None, **kwargs: Any
    ) -> ChatDifficultyRouter:
        """Load a router saved with ``DifficultyRouter.save`` and wrap it."""
        from difficulty_router import DifficultyRouter

        return cls(router=DifficultyRouter.load(path, extractor=extractor), models=models, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "difficulty-router"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        policy = getattr(self.router, "policy", None)
        return {
            "models": list(self.models),
            "policy": str(policy) if policy is not None else None,
            "cascade": list(self.cascade.ladder) if self.cascade is not None else None,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """The routed pool model's own parameters (provider, model name), so tracing can price the call."""
        prepared = PREPARED.get()
        chosen = prepared.decision.model if prepared and prepared.owner is self and prepared.decision else None
        model = self.models.get(chosen) if chosen else None
        if isinstance(model, BaseChatModel):
            params = model._get_ls_params(stop=stop or self.stop)
        else:
            params = LangSmithParams(
                ls_provider="difficulty_router",
                ls_model_type="chat",
                ls_model_name=chosen or f"difficulty-router({','.join(self.models)})",
            )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        if kwargs.get("model"):  # a per-call model= goes on to the pool model
            params["ls_model_name"] = kwargs["model"]
        return params

    # -- tools and structured output --------------------------------------------------
    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools are kept in OpenAI format (what agents inspect) and re-bound on whichever model a call picks."""
        bound: dict[str, Any] = {"tools": [convert_to_openai_tool(t) for t in tools]}
        if tool_choice is not None:
            bound["tool_choice"] = tool_choice
        if "ls_structured_output_format" in kwargs:
            bound["ls_structured_output_format"] = kwargs.pop("ls_structured_output_format")
        if kwargs:
            bound["tool_kwargs"] = kwargs
        return self.bind(**bound)

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Runnable:
        """Each call routes, then uses the chosen model's own ``with_structured_output`` (its native
        ``method=``/``strict=``), escalating like any call; with ``include_raw`` the raw message
        carries the record."""
        return routed_structured_output(self, schema, include_raw=include_raw, **kwargs)

    def _exclusions(self, kwargs: dict) -> dict[str, str]:
        if not kwargs.get("tools"):
            return {}
        return self._binding.tool_exclusions(tool_capability(self.models, self.tool_calling))

    def _pool_model(self, name: str, kwargs: dict) -> tuple[Runnable, dict]:
        """The pool model with the call's tools re-bound on it, and the kwargs it gets."""
        call = dict(kwargs)
        tools, tool_choice = call.pop("tools", None), call.pop("tool_choice", None)
        tool_kwargs = call.pop("tool_kwargs", None) or {}
        call.pop("ls_structured_output_format", None)
        model = self.models[name]
        if tools:
            model = model.bind_tools(
                tools, **({"tool_choice": tool_choice} if tool_choice is not None else {}), **tool_kwargs
            )
        return model, call

    # -- the calls: the core walks the ladder, these call one pool model ------------------
    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream

            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        prepared = self._take(messages, kwargs)
        call, cfg = self._call(prepared, messages), pool_config(prepared.config)

        def invoke(name: str) -> Reply:
            model, kw = self._pool_model(name, kwargs)
            return message_reply(model.invoke(messages, cfg, stop=stop or self.stop, **kw))

        reply = dispatch.run_sync(call, invoke, AttemptRuns(run_manager, messages))
        return ChatResult(generations=[ChatGeneration(message=with_record(reply.value, call))])

    async def _agenerate(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import agenerate_from_stream

            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        prepared = self._take(messages, kwargs)
        call, cfg = self._call(prepared, messages), pool_config(prepared.config)

        async def invoke(name: str) -> Reply:
            model, kw = self._pool_model(name, kwargs)
            return message_reply(await model.ainvoke(messages, cfg, stop=stop or self.stop, **kw))

        reply = await dispatch.run_async(call, invoke, AttemptRuns(run_manager, messages))
        return ChatResult(generations=[ChatGeneration(message=with_record(reply.value, call))])

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        prepared = self._take(messages, kwargs)
        call, cfg = self._call(prepared, messages), pool_config(prepared.config)

        def open_stream(name: str) -> Iterator[AIMessageChunk]:
            model, kw = self._pool_model(name, kwargs)
            return model.stream(messages, cfg, stop=stop or self.stop, **kw)

        opened = dispatch.stream_sync(
            call,
            open_stream,
            lambda c: message_reply(join_chunks(c)),
            AttemptRuns(run_manager or prepared.parent, messages),
        )
        yield from release(opened.head, call)
        for rest in opened.tail:
            yield ChatGenerationChunk(message=rest)

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        prepared = self._take(messages, kwargs)
        call, cfg = self._call(prepared, messages), pool_config(prepared.config)

        def open_stream(name: str) -> AsyncIterator[AIMessageChunk]:
            model, kw = self._pool_model(name, kwargs)
            return model.astream(messages, cfg, stop=stop or self.stop, **kw)

        opened = await dispatch.stream_async(
            call,
            open_stream,
            lambda c: message_reply(join_chunks(c)),
            AttemptRuns(run_manager or prepared.parent, messages),
        )
        for chunk in release(opened.head, call):
            yield chunk
        async for rest in opened.tail:
            yield ChatGenerationChunk(message=rest)

    def _call(self, prepared: Prepared, messages: list[BaseMessage]) -> dispatch.RoutedCall:
        return self._binding.start(prepared.decision, query=to_router_query(messages))
