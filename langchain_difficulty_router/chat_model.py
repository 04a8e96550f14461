"""``ChatDifficultyRouter``: a chat model that routes each call to one of several chat models.

The adapter holds no routing logic: the core router decides, this class converts the
conversation, delegates to the chosen model, escalates along ``decision.fallbacks`` when
that model fails transiently, and records what happened in ``response_metadata``.

Callbacks see the router's own chat-model run plus one child chain run per attempt,
named after and tagged with the pool model tried. The pool model itself is called without
the caller's callbacks: otherwise every streamed token and every usage record would be
reported twice (once by the pool model's run, once by the router's).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from types import SimpleNamespace
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, get_config_list, get_executor_for_config, run_in_executor
from langchain_core.runnables.utils import gather_with_concurrency
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from ._convert import to_router_query

META_KEY = "difficulty_router"
_DECISION_KWARG = "difficulty_router_decision"
_RUN_KWARG = "difficulty_router_run"
# Fragments of exception class names that mean "this provider is unavailable right now"
# across SDKs (openai, anthropic, httpx, google, ...), none of which this package imports.
_TRANSIENT_NAMES = ("RateLimit", "Timeout", "TimedOut", "Connection", "Overloaded", "ServiceUnavailable",
                    "InternalServerError", "ResourceExhausted", "TooManyRequests")


def is_transient_error(exc: BaseException) -> bool:
    """Default escalation test: rate limits, timeouts, connection and server-side errors."""
    if isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    return any(frag in cls.__name__ for cls in type(exc).__mro__ for frag in _TRANSIENT_NAMES)


def _can_call_tools(model: Any) -> bool:
    if isinstance(model, BaseChatModel):
        if type(model).bind_tools is BaseChatModel.bind_tools:
            return False
        profile = getattr(model, "profile", None) or {}
        return profile.get("tool_calling", True) is not False
    return callable(getattr(model, "bind_tools", None))


class ChatDifficultyRouter(BaseChatModel):
    """Routes each call to the cheapest pool chat model the router expects to answer it.

    Args:
        router: a trained ``difficulty_router.DifficultyRouter``.
        models: ``{pool model name: chat model}``; must cover the router's pool exactly.
        tool_calling: ``{name: bool}`` overrides for whether a pool model can call tools
            (by default: it implements ``bind_tools`` and its profile does not deny it).
        escalate_on: exception types, or a predicate on the exception, that make the call
            move on to the next more capable model; default :func:`is_transient_error`.
        max_retries: extra tries of the same model on such an error before escalating.
        stop: default stop sequences passed to the chosen model.
        temperature, max_tokens, timeout: accepted so the router drops into code written for
            any chat model and reported to tracing; they do not override the pool models'
            own settings (configure each pool model itself).
    """

    router: Any = Field(exclude=True)
    models: dict[str, Any]
    tool_calling: dict[str, bool] = Field(default_factory=dict)
    escalate_on: Any = None
    max_retries: int | None = None
    stop: list[str] | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout: float | None = None
    streaming: bool = False

    model_config = ConfigDict(arbitrary_types_allowed=True)
    _pending: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_pool(self) -> ChatDifficultyRouter:
        if not hasattr(self.router, "route_batch") or not hasattr(self.router, "models"):
            raise TypeError(f"router must be a difficulty_router.DifficultyRouter, got {type(self.router).__name__}")
        pool = list(self.router.models)
        missing = [m for m in pool if m not in self.models]
        extra = sorted(set(self.models) - set(pool))
        if missing:
            raise ValueError(f"no chat model given for pool model(s) {missing}; models= must map every "
                             f"name in the router's pool {pool} to a chat model")
        if extra:
            raise ValueError(f"models= names {extra}, which are not in the router's pool {pool}")
        for name, model in self.models.items():
            if not isinstance(model, Runnable):
                raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not a LangChain chat model")
        unknown = sorted(set(self.tool_calling) - set(pool))
        if unknown:
            raise ValueError(f"tool_calling= names {unknown}, which are not in the router's pool {pool}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        return self

    @classmethod
    def from_router_dir(cls, path: str | os.PathLike, models: dict[str, Any], *, extractor: Any = None,
                        **kwargs: Any) -> ChatDifficultyRouter:
        """Load a router saved with ``DifficultyRouter.save`` and wrap it."""
        from difficulty_router import DifficultyRouter

        return cls(router=DifficultyRouter.load(path, extractor=extractor), models=models, **kwargs)

    # -- identity --------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "difficulty-router"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        policy = getattr(self.router, "policy", None)
        return {"models": list(self.models), "policy": str(policy) if policy is not None else None}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="difficulty_router", ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") or f"difficulty-router({','.join(self.models)})")
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    # -- tools -----------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools to the router; they are re-bound on whichever model each call picks.

        ``tools`` is stored in OpenAI format (what LangGraph and agents inspect); other
        ``bind_tools`` options go to the chosen model's own ``bind_tools``.
        """
        bound: dict[str, Any] = {"tools": [convert_to_openai_tool(t) for t in tools]}
        if tool_choice is not None:
            bound["tool_choice"] = tool_choice
        if "ls_structured_output_format" in kwargs:
            bound["ls_structured_output_format"] = kwargs.pop("ls_structured_output_format")
        if kwargs:
            bound["tool_kwargs"] = kwargs
        return self.bind(**bound)

    def _tool_exclusions(self, kwargs: dict) -> dict[str, str]:
        if not kwargs.get("tools"):
            return {}
        out = {}
        for name, model in self.models.items():
            if not self.tool_calling.get(name, _can_call_tools(model)):
                out[name] = "cannot call tools"
        return out

    # -- routing ---------------------------------------------------------------------
    def _decide(self, messages: Sequence[BaseMessage], kwargs: dict):
        token = kwargs.pop(_DECISION_KWARG, None)
        if token is not None and token in self._pending:
            return self._pending.pop(token)
        return self.router.route(to_router_query(list(messages)), exclude=self._tool_exclusions(kwargs) or None)

    def _decide_batch(self, inputs: list[Any], kwargs: dict) -> list[str] | None:
        """Route a whole batch in one extraction; the per-call runs pick their decision up by token."""
        try:
            queries = [to_router_query(self._convert_input(x).to_messages()) for x in inputs]
            decisions = self.router.route_batch(queries, exclude=self._tool_exclusions(kwargs) or None,
                                                progress=False)
        except (ValueError, TypeError):
            return None  # a bad input: let each call route alone so only that one fails
        tokens = [uuid.uuid4().hex for _ in decisions]
        self._pending.update(zip(tokens, decisions))
        return tokens

    def _should_escalate(self, exc: BaseException) -> bool:
        rule = self.escalate_on
        if rule is None:
            return is_transient_error(exc)
        if isinstance(rule, type) or (isinstance(rule, tuple) and all(isinstance(r, type) for r in rule)):
            return isinstance(exc, rule)
        if callable(rule):
            return bool(rule(exc))
        raise TypeError("escalate_on must be an exception type, a tuple of them, or a predicate")

    def _target(self, name: str, kwargs: dict) -> tuple[Runnable, dict]:
        """The pool model to call, with tools re-bound on it, and the per-call kwargs it gets."""
        call = dict(kwargs)
        tools = call.pop("tools", None)
        tool_choice = call.pop("tool_choice", None)
        tool_kwargs = call.pop("tool_kwargs", None) or {}
        call.pop("ls_structured_output_format", None)
        model = self.models[name]
        if tools:
            extra = {"tool_choice": tool_choice} if tool_choice is not None else {}
            model = model.bind_tools(tools, **extra, **tool_kwargs)
        return model, call

    def _attempts(self, decision) -> list[str]:
        return [decision.model, *decision.fallbacks]

    def _metadata(self, decision, name: str, failures: list[dict]) -> dict:
        attempts = [{"model": f["model"], "error": f["error"]} for f in failures]
        return {**decision.to_dict(), "chosen": decision.model, "served_by": name,
                "escalated": name != decision.model, "attempts": attempts + [{"model": name, "error": None}]}

    def _finish_message(self, message: BaseMessage, meta: dict, name: str) -> AIMessage:
        response_metadata = dict(message.response_metadata or {})
        response_metadata.setdefault("model_name", name)
        response_metadata[META_KEY] = meta
        return message.model_copy(update={"response_metadata": response_metadata})

    @staticmethod
    def _failure(name: str, exc: BaseException) -> dict:
        return {"model": name, "error": f"{type(exc).__name__}: {exc}", "exception": exc}

    def _stop(self, stop: list[str] | None) -> list[str] | None:
        return stop if stop is not None else self.stop

    # -- sync ------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        self._take_run(None, kwargs)
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        decision = self._decide(messages, kwargs)
        failures: list[dict] = []
        for name in self._attempts(decision):
            model, call = self._target(name, kwargs)
            for _ in range((self.max_retries or 0) + 1):
                child = self._start_child(run_manager, name, messages, decision, failures)
                try:
                    message = model.invoke(messages, {"callbacks": []}, stop=self._stop(stop), **call)
                except Exception as exc:
                    if child:
                        child.on_chain_error(exc)
                    if not self._should_escalate(exc):
                        raise
                    failures.append(self._failure(name, exc))
                    continue
                meta = self._metadata(decision, name, failures)
                if child:
                    child.on_chain_end({"output": message, META_KEY: meta})
                return ChatResult(generations=[ChatGeneration(message=self._finish_message(message, meta, name))])
        raise self._exhausted(decision, failures)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        run_manager = self._take_run(run_manager, kwargs)
        decision = self._decide(messages, kwargs)
        failures: list[dict] = []
        for name in self._attempts(decision):
            model, call = self._target(name, kwargs)
            for _ in range((self.max_retries or 0) + 1):
                child = self._start_child(run_manager, name, messages, decision, failures)
                started = False
                try:
                    for chunk in model.stream(messages, {"callbacks": []}, stop=self._stop(stop), **call):
                        if not started:
                            started = True
                            chunk = self._tag_first_chunk(chunk, decision, name, failures)
                        yield ChatGenerationChunk(message=chunk)
                    if not started:  # the model streamed nothing: still report the decision
                        yield ChatGenerationChunk(message=self._tag_first_chunk(
                            AIMessageChunk(content=""), decision, name, failures))
                except Exception as exc:
                    if child:
                        child.on_chain_error(exc)
                    # Once tokens have reached the caller, a retry would repeat them.
                    if started or not self._should_escalate(exc):
                        raise
                    failures.append(self._failure(name, exc))
                    continue
                if child:
                    child.on_chain_end({META_KEY: self._metadata(decision, name, failures)})
                return
        raise self._exhausted(decision, failures)

    # -- async -----------------------------------------------------------------------
    async def _adecide(self, messages, kwargs):
        token = kwargs.get(_DECISION_KWARG)
        if token is not None and token in self._pending:
            kwargs.pop(_DECISION_KWARG)
            return self._pending.pop(token)
        return await run_in_executor(None, self._decide, messages, kwargs)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        kwargs = dict(kwargs)
        self._take_run(None, kwargs)
        if self.streaming:
            from langchain_core.language_models.chat_models import agenerate_from_stream
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        kwargs = dict(kwargs)
        decision = await self._adecide(messages, kwargs)
        failures: list[dict] = []
        for name in self._attempts(decision):
            model, call = self._target(name, kwargs)
            for _ in range((self.max_retries or 0) + 1):
                child = await self._astart_child(run_manager, name, messages, decision, failures)
                try:
                    message = await model.ainvoke(messages, {"callbacks": []}, stop=self._stop(stop), **call)
                except Exception as exc:
                    if child:
                        await child.on_chain_error(exc)
                    if not self._should_escalate(exc):
                        raise
                    failures.append(self._failure(name, exc))
                    continue
                meta = self._metadata(decision, name, failures)
                if child:
                    await child.on_chain_end({"output": message, META_KEY: meta})
                return ChatResult(generations=[ChatGeneration(message=self._finish_message(message, meta, name))])
        raise self._exhausted(decision, failures)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        kwargs = dict(kwargs)
        run_manager = self._take_run(run_manager, kwargs)
        decision = await self._adecide(messages, kwargs)
        failures: list[dict] = []
        for name in self._attempts(decision):
            model, call = self._target(name, kwargs)
            for _ in range((self.max_retries or 0) + 1):
                child = await self._astart_child(run_manager, name, messages, decision, failures)
                started = False
                try:
                    async for chunk in model.astream(messages, {"callbacks": []}, stop=self._stop(stop), **call):
                        if not started:
                            started = True
                            chunk = self._tag_first_chunk(chunk, decision, name, failures)
                        yield ChatGenerationChunk(message=chunk)
                    if not started:
                        yield ChatGenerationChunk(message=self._tag_first_chunk(
                            AIMessageChunk(content=""), decision, name, failures))
                except Exception as exc:
                    if child:
                        await child.on_chain_error(exc)
                    if started or not self._should_escalate(exc):
                        raise
                    failures.append(self._failure(name, exc))
                    continue
                if child:
                    await child.on_chain_end({META_KEY: self._metadata(decision, name, failures)})
                return
        raise self._exhausted(decision, failures)

    # -- streaming: BaseChatModel.(a)stream does not hand _stream its run manager -----
    def _run_handle(self, config: RunnableConfig | None) -> tuple[RunnableConfig, str]:
        """Fix the run id of the coming chat-model run and keep what its child runs inherit,
        so ``_stream`` can report its attempts as children of the right run."""
        config = ensure_config(config)
        run_id = config.get("run_id") or uuid.uuid4()
        parent = CallbackManager.configure(config.get("callbacks"), self.callbacks, self.verbose,
                                           config.get("tags"), self.tags, config.get("metadata"), self.metadata)
        token = uuid.uuid4().hex
        self._pending[token] = SimpleNamespace(run_id=run_id, inheritable_handlers=parent.inheritable_handlers,
                                               inheritable_tags=parent.inheritable_tags,
                                               inheritable_metadata=parent.inheritable_metadata)
        return {**config, "run_id": run_id}, token

    def _take_run(self, run_manager, kwargs: dict):
        handle = self._pending.pop(kwargs.pop(_RUN_KWARG, None), None)
        return run_manager if run_manager is not None else handle

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        config, token = self._run_handle(config)
        try:
            yield from super().stream(input, config, stop=stop, **{_RUN_KWARG: token}, **kwargs)
        finally:
            self._pending.pop(token, None)

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        config, token = self._run_handle(config)
        try:
            async for chunk in super().astream(input, config, stop=stop, **{_RUN_KWARG: token}, **kwargs):
                yield chunk
        finally:
            self._pending.pop(token, None)

    # -- batch: one extraction for the whole batch -----------------------------------
    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:
        tokens = self._decide_batch(inputs, kwargs) if len(inputs) > 1 else None
        if tokens is None:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        configs = get_config_list(config, len(inputs))

        def one(i: int):
            try:
                return self.invoke(inputs[i], configs[i], **{_DECISION_KWARG: tokens[i]}, **kwargs)
            except Exception as exc:
                if return_exceptions:
                    return exc
                raise
            finally:
                self._pending.pop(tokens[i], None)

        with get_executor_for_config(configs[0]) as executor:
            return list(executor.map(one, range(len(inputs))))

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[AIMessage]:
        tokens = await run_in_executor(None, self._decide_batch, inputs, kwargs) if len(inputs) > 1 else None
        if tokens is None:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        configs = get_config_list(config, len(inputs))

        async def one(i: int):
            try:
                return await self.ainvoke(inputs[i], configs[i], **{_DECISION_KWARG: tokens[i]}, **kwargs)
            except Exception as exc:
                if return_exceptions:
                    return exc
                raise
            finally:
                self._pending.pop(tokens[i], None)

        return await gather_with_concurrency(configs[0].get("max_concurrency"), *(one(i) for i in range(len(inputs))))

    # -- helpers ---------------------------------------------------------------------
    def _tag_first_chunk(self, chunk: AIMessageChunk, decision, name: str, failures: list[dict]) -> AIMessageChunk:
        response_metadata = dict(chunk.response_metadata or {})
        response_metadata[META_KEY] = self._metadata(decision, name, failures)
        return chunk.model_copy(update={"response_metadata": response_metadata})

    def _child_inputs(self, messages, decision, failures) -> dict:
        return {"messages": messages, "decision": decision.to_dict(),
                "previous_failures": [{"model": f["model"], "error": f["error"]} for f in failures]}

    @staticmethod
    def _child_manager(run_manager, manager_cls, name: str, failures: list):
        # LLM run managers have no get_child(); build the child manager the way ParentRunManager does.
        manager = manager_cls(handlers=[], parent_run_id=run_manager.run_id)
        manager.set_handlers(run_manager.inheritable_handlers)
        manager.add_tags(run_manager.inheritable_tags)
        manager.add_metadata(run_manager.inheritable_metadata)
        manager.add_tags([f"{META_KEY}:{name}"], inherit=False)
        manager.add_metadata({"difficulty_router_model": name, "difficulty_router_attempt": len(failures)},
                             inherit=False)
        return manager

    def _start_child(self, run_manager, name, messages, decision, failures):
        if run_manager is None:
            return None
        return self._child_manager(run_manager, CallbackManager, name, failures).on_chain_start(
            {"name": name}, self._child_inputs(messages, decision, failures), name=name)

    async def _astart_child(self, run_manager, name, messages, decision, failures):
        if run_manager is None:
            return None
        return await self._child_manager(run_manager, AsyncCallbackManager, name, failures).on_chain_start(
            {"name": name}, self._child_inputs(messages, decision, failures), name=name)

    @staticmethod
    def _exhausted(decision, failures: list[dict]) -> BaseException:
        """The last model's own exception (callers catch provider errors), annotated with every attempt."""
        err = failures[-1]["exception"]
        tried = "; ".join(f"{f['model']}: {f['error']}" for f in failures)
        err.add_note(f"difficulty_router: every eligible model failed ({len(failures)} attempts: {tried})")
        return err
