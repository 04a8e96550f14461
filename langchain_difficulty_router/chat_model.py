"""``ChatDifficultyRouter``: a chat model that routes each call to one of several chat models.

The adapter holds no routing logic: the core router decides, this class converts the
conversation, delegates to the chosen model, escalates along ``decision.fallbacks`` when
that model fails transiently, and records what happened in ``response_metadata``.

Callbacks see the router's own chat-model run plus one child chain run per attempt,
named after and tagged with the pool model tried. The pool model itself is called without
the caller's callbacks: otherwise every streamed token and every usage record would be
reported twice (once by the pool model's run, once by the router's).

With ``cascade=`` (a :class:`difficulty_router.cascade.CascadePolicy`) the call walks the
policy's ladder instead: the core :class:`~difficulty_router.cascade.CascadeRun` decides
after each rung's answer whether to accept it or escalate; this class only calls the rung,
reads its logprobs and token usage, and records them.
"""

from __future__ import annotations

import functools
import operator
import os
import uuid
from dataclasses import asdict
from types import SimpleNamespace
from collections.abc import AsyncIterator, Iterator, Sequence
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

from difficulty_router.cascade import CascadePolicy, CascadeRun, hybrid_start, pool_cost_fn
from difficulty_router.confidence import MissingLogprobsError, openai_token_logprobs
from difficulty_router.errors import is_transient_error

from ._convert import to_router_query

META_KEY = "difficulty_router"
CASCADE_KEY = "difficulty_router_cascade"
"""``response_metadata`` key of the cascade record: every rung tried, its P(T)/P(IK), verdict and cost."""
_DECISION_KWARG = "difficulty_router_decision"
_RUN_KWARG = "difficulty_router_run"


def _can_call_tools(model: Any) -> bool:
    if isinstance(model, BaseChatModel):
        if type(model).bind_tools is BaseChatModel.bind_tools:
            return False
        profile = getattr(model, "profile", None) or {}
        return profile.get("tool_calling", True) is not False
    return callable(getattr(model, "bind_tools", None))


def message_signals(message: BaseMessage) -> dict[str, Any]:
    """What a cascade rung's reply gives the policy: answer tokens, their logprobs, token usage.

    Logprobs come from ``response_metadata["logprobs"]`` (ChatOpenAI and compatible models
    put the OpenAI dict there when built with ``logprobs=True``); without them both are None
    and the policy's ``on_missing_logprobs`` decides.
    """
    tokens = logprobs = None
    raw = (message.response_metadata or {}).get("logprobs")
    if raw is not None:
        try:
            tokens, logprobs = openai_token_logprobs(raw)
        except MissingLogprobsError:
            pass
    usage = getattr(message, "usage_metadata", None) or {}
    return {"tokens": tokens, "logprobs": logprobs, "prompt_tokens": int(usage.get("input_tokens") or 0),
            "completion_tokens": int(usage.get("output_tokens") or 0)}


def _join(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    return functools.reduce(operator.add, chunks) if chunks else AIMessageChunk(content="")


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
        cascade: a ``CascadePolicy``: answer with the cheapest ladder rung and escalate while
            its confidence (P(T) from the reply's logprobs, P(IK) from ``pik_scorers``) is
            below the policy's thresholds. Every ladder name must be a key of ``models``.
            Without a router the cascade alone decides; ``router`` may then be omitted.
            Streaming buffers each rung's chunks until the policy accepts that rung, then
            streams them out: a rejected rung's chunks never reach the caller, so the first
            token arrives only after the accepted rung has finished. Rung errors that
            ``escalate_on`` accepts escalate to the next rung. The record of every rung tried
            is in ``response_metadata["difficulty_router_cascade"]`` (first chunk when streaming).
        pik_scorers: ``{ladder model: callable(conversation) -> float}``: P(IK) for rungs with a
            local probe, called with the conversation in the core's form (a list of OpenAI
            message dicts), e.g. ``lambda q: float(probe.score(extractor, [q])[0])``.
        skip_threshold: hybrid mode (needs ``router``): start at the first rung whose routing
            probability is at least this, via ``difficulty_router.cascade.hybrid_start``.
        temperature, max_tokens, timeout: accepted so the router drops into code written for
            any chat model and reported to tracing; they do not override the pool models'
            own settings (configure each pool model itself).
    """

    router: Any = Field(default=None, exclude=True)
    models: dict[str, Any]
    cascade: Any = Field(default=None, exclude=True)
    pik_scorers: dict[str, Any] = Field(default_factory=dict, exclude=True)
    skip_threshold: float | None = None
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
        if self.router is None and self.cascade is None:
            raise ValueError("ChatDifficultyRouter needs a router, a cascade policy, or both")
        if self.router is not None:
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
        else:
            pool = list(self.models)
        for name, model in self.models.items():
            if not isinstance(model, Runnable):
                raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not a LangChain chat model")
        unknown = sorted(set(self.tool_calling) - set(pool))
        if unknown:
            raise ValueError(f"tool_calling= names {unknown}, which are not in the router's pool {pool}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        self._check_cascade()
        return self

    def _check_cascade(self) -> None:
        if self.cascade is None:
            if self.pik_scorers or self.skip_threshold is not None:
                raise ValueError("pik_scorers= and skip_threshold= only apply with cascade=")
            return
        if not isinstance(self.cascade, CascadePolicy):
            raise TypeError(f"cascade must be a difficulty_router.cascade.CascadePolicy, got "
                            f"{type(self.cascade).__name__}")
        ladder = list(self.cascade.ladder)
        missing = [m for m in ladder if m not in self.models]
        if missing:
            raise ValueError(f"the cascade ladder names {missing}, which are not among the configured models "
                             f"{list(self.models)}; give models= a chat model for every rung")
        unknown = sorted(set(self.pik_scorers) - set(ladder))
        if unknown:
            raise ValueError(f"pik_scorers= names {unknown}, which are not on the cascade ladder {ladder}")
        for name, scorer in self.pik_scorers.items():
            if not callable(scorer):
                raise TypeError(f"pik_scorers[{name!r}] must be callable(conversation) -> float")
        if self.cascade.needs_pik:
            lacking = [m for m in ladder[:-1] if m not in self.pik_scorers]
            if lacking:
                raise ValueError(f"the cascade policy uses P(IK) but rungs {lacking} have no pik_scorers= entry")
        if self.skip_threshold is not None:
            if self.router is None:
                raise ValueError("skip_threshold= (hybrid mode) needs a router to read the start rung from")
            if isinstance(self.skip_threshold, bool) or not 0 <= self.skip_threshold <= 1:
                raise ValueError(f"skip_threshold must be in [0, 1], got {self.skip_threshold!r}")

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
        params = {"models": list(self.models), "policy": str(policy) if policy is not None else None}
        if self.cascade is not None:
            params["cascade"] = list(self.cascade.ladder)
        return params

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
        if self.router is None or (self.cascade is not None and self.skip_threshold is None):
            return None  # nothing to route: the cascade alone decides
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
        if self.cascade is not None:
            return self._cascade_generate(messages, stop, run_manager, kwargs)
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
        if self.cascade is not None:
            yield from self._cascade_stream(messages, stop, run_manager, kwargs)
            return
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
        if self.cascade is not None:
            return await self._acascade_generate(messages, stop, run_manager, kwargs)
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
        if self.cascade is not None:
            async for chunk in self._acascade_stream(messages, stop, run_manager, kwargs):
                yield chunk
            return
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

    # -- cascade: the core CascadeRun decides; these only call rungs and record replies --
    def _cost_fn(self):
        pool = getattr(self.router, "pool", None)
        return pool_cost_fn(pool) if pool is not None else None

    def _new_run(self, decision) -> CascadeRun:
        start = hybrid_start(self.cascade, decision.probabilities, self.skip_threshold) if decision else None
        return CascadeRun(self.cascade, start=start, decision=decision, cost_fn=self._cost_fn())

    def _cascade_start(self, messages, kwargs) -> CascadeRun:
        if self.skip_threshold is None:
            kwargs.pop(_DECISION_KWARG, None)
            return self._new_run(None)
        return self._new_run(self._decide(messages, kwargs))

    async def _acascade_start(self, messages, kwargs) -> CascadeRun:
        if self.skip_threshold is None:
            kwargs.pop(_DECISION_KWARG, None)
            return self._new_run(None)
        return self._new_run(await self._adecide(messages, kwargs))

    def _pik(self, name: str, messages) -> float | None:
        scorer = self.pik_scorers.get(name)
        return None if scorer is None else float(scorer(to_router_query(list(messages))))

    def _cascade_escalates(self, exc: BaseException) -> bool:
        return not isinstance(exc, MissingLogprobsError) and self._should_escalate(exc)

    def _cascade_inputs(self, messages, run: CascadeRun) -> dict:
        return {"messages": messages, "cascade_rung": run.next_model,
                "previous_attempts": [asdict(a) for a in run.attempts]}

    def _cascade_child(self, run_manager, messages, run: CascadeRun):
        if run_manager is None:
            return None
        name = run.next_model
        return self._child_manager(run_manager, CallbackManager, name, run.attempts).on_chain_start(
            {"name": name}, self._cascade_inputs(messages, run), name=name)

    async def _acascade_child(self, run_manager, messages, run: CascadeRun):
        if run_manager is None:
            return None
        name = run.next_model
        return await self._child_manager(run_manager, AsyncCallbackManager, name, run.attempts).on_chain_start(
            {"name": name}, self._cascade_inputs(messages, run), name=name)

    def _cascade_meta(self, run: CascadeRun) -> dict:
        served = run.result().model
        record = {**(run.decision.to_dict() if run.decision is not None else {}), "mode": "cascade",
                  "chosen": run.start, "served_by": served, "escalated": served != run.start,
                  "attempts": [{"model": a.model, "error": a.error, "accepted": a.accepted} for a in run.attempts]}
        return {META_KEY: record, CASCADE_KEY: run.metadata()["cascade"]}

    def _cascade_tag(self, message: BaseMessage, run: CascadeRun) -> BaseMessage:
        response_metadata = dict(message.response_metadata or {})
        response_metadata.setdefault("model_name", run.result().model)
        response_metadata.update(self._cascade_meta(run))
        return message.model_copy(update={"response_metadata": response_metadata})

    def _cascade_loop(self, messages, stop, run_manager, kwargs, streaming: bool):
        """Drive the core CascadeRun to its accepted rung; returns the run, its message and, when
        streaming, that rung's buffered chunks (a rung's chunks reach the caller only once accepted)."""
        run = self._cascade_start(messages, kwargs)
        while not run.done:
            name = run.next_model
            model, call = self._target(name, kwargs)
            child = self._cascade_child(run_manager, messages, run)
            try:
                pik = self._pik(name, messages)
                if streaming:
                    chunks = list(model.stream(messages, {"callbacks": []}, stop=self._stop(stop), **call))
                    message = _join(chunks)
                else:
                    chunks, message = None, model.invoke(messages, {"callbacks": []}, stop=self._stop(stop), **call)
                attempt = run.record(name, message.text, pik=pik, **message_signals(message))
            except Exception as exc:
                if child:
                    child.on_chain_error(exc)
                if not self._cascade_escalates(exc):
                    raise
                run.record_failure(name, exc)  # re-raises at the top of the ladder
                continue
            if child:
                child.on_chain_end({"output": message, META_KEY: asdict(attempt)})
        return run, message, chunks

    async def _acascade_loop(self, messages, stop, run_manager, kwargs, streaming: bool):
        """The async twin of _cascade_loop (same steps, awaited calls)."""
        run = await self._acascade_start(messages, kwargs)
        while not run.done:
            name = run.next_model
            model, call = self._target(name, kwargs)
            child = await self._acascade_child(run_manager, messages, run)
            try:
                pik = await run_in_executor(None, self._pik, name, messages)
                if streaming:
                    chunks = [c async for c in model.astream(messages, {"callbacks": []}, stop=self._stop(stop), **call)]
                    message = _join(chunks)
                else:
                    chunks = None
                    message = await model.ainvoke(messages, {"callbacks": []}, stop=self._stop(stop), **call)
                attempt = run.record(name, message.text, pik=pik, **message_signals(message))
            except Exception as exc:
                if child:
                    await child.on_chain_error(exc)
                if not self._cascade_escalates(exc):
                    raise
                run.record_failure(name, exc)
                continue
            if child:
                await child.on_chain_end({"output": message, META_KEY: asdict(attempt)})
        return run, message, chunks

    def _cascade_generate(self, messages, stop, run_manager, kwargs) -> ChatResult:
        run, message, _ = self._cascade_loop(messages, stop, run_manager, kwargs, streaming=False)
        return ChatResult(generations=[ChatGeneration(message=self._cascade_tag(message, run))])

    def _cascade_stream(self, messages, stop, run_manager, kwargs) -> Iterator[ChatGenerationChunk]:
        run, _, chunks = self._cascade_loop(messages, stop, run_manager, kwargs, streaming=True)
        yield from self._cascade_release(chunks, run)

    async def _acascade_generate(self, messages, stop, run_manager, kwargs) -> ChatResult:
        run, message, _ = await self._acascade_loop(messages, stop, run_manager, kwargs, streaming=False)
        return ChatResult(generations=[ChatGeneration(message=self._cascade_tag(message, run))])

    async def _acascade_stream(self, messages, stop, run_manager, kwargs) -> AsyncIterator[ChatGenerationChunk]:
        run, _, chunks = await self._acascade_loop(messages, stop, run_manager, kwargs, streaming=True)
        for chunk in self._cascade_release(chunks, run):
            yield chunk

    def _cascade_release(self, chunks: list[AIMessageChunk], run: CascadeRun) -> Iterator[ChatGenerationChunk]:
        """The accepted rung's buffered chunks; the first carries the routing and cascade records."""
        chunks = chunks or [AIMessageChunk(content="")]
        yield ChatGenerationChunk(message=self._cascade_tag(chunks[0], run))
        for chunk in chunks[1:]:
            yield ChatGenerationChunk(message=chunk)

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
