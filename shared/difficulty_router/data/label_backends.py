"""The models ``difficulty-router label`` calls: one :class:`Backend` per pool model, with its prices.

A backend is a name, a ``call(messages, settings) -> Reply`` and the pool entry that prices it. Two
kinds exist: an OpenAI-compatible endpoint from a pool file (:func:`openai_backend`, which pickles so
the Ray engine can ship it to workers) and any LangChain chat model (:func:`langchain_backend`). The
labelling run (:mod:`.labelling`) only ever sees backends, so it does not care which kind answers.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from difficulty_router.core.pool import PoolModel
from difficulty_router.data.queries import conversation_text


@dataclass
class Reply:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass
class Backend:
    """One callable model: ``call(messages, settings) -> Reply``, with its prices."""

    name: str
    call: Callable[[list[dict], dict], Reply]
    spec: PoolModel | None = None

    def cost(self, reply: Reply, messages: list[dict]) -> float:
        spec = self.spec
        if spec is None:
            return 0.0
        if spec.cost_per_query is not None:
            return float(spec.cost_per_query)
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else len(conversation_text(messages)) / 4
        completion = reply.completion_tokens if reply.completion_tokens is not None else len(reply.text) / 4
        return (prompt * (spec.input_cost_per_1m or 0.0) + completion * (spec.output_cost_per_1m or 0.0)) / 1e6


def openai_backend(spec: PoolModel) -> Backend:
    """A pool model served at ``spec.base_url`` through the OpenAI client (no client-side retries: ours).

    The backend pickles (its call keeps the spec and builds its client on first use), so the Ray engine
    sends it to workers; a worker reads the API key from its own environment."""
    if not spec.base_url:
        raise ValueError(f"pool model {spec.name!r} has no base_url; label needs an endpoint (or a LangChain model)")
    if spec.api_key_env and not os.environ.get(spec.api_key_env):
        raise ValueError(f"pool model {spec.name!r}: the environment variable {spec.api_key_env} is not set here")
    return Backend(spec.name, OpenAICall(spec), spec)


class OpenAICall:
    """``call(messages, settings) -> Reply`` against an OpenAI-compatible endpoint; the client is built lazily
    and left out of the pickled state (it holds sockets and locks)."""

    def __init__(self, spec: PoolModel) -> None:
        self.spec = spec
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"])  # type: ignore[misc]

    def _ensure_client(self):
        with self._lock:
            if self._client is None:
                import openai

                spec = self.spec
                key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else "none"
                if spec.api_key_env and not key:
                    raise ValueError(
                        f"pool model {spec.name!r}: the environment variable {spec.api_key_env} is not set here"
                    )
                self._client = openai.OpenAI(
                    base_url=spec.base_url, api_key=key or "none", timeout=spec.timeout or 60.0, max_retries=0
                )
            return self._client

    def __call__(self, messages: list[dict], settings: dict) -> Reply:
        client = self._ensure_client()
        extra = {k: settings[k] for k in ("temperature", "max_tokens") if k in settings}
        response = client.chat.completions.create(model=self.spec.served_model, messages=messages, **extra)
        usage = response.usage
        return Reply(
            text=response.choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )


def langchain_backend(name: str, chat_model: Any, spec: PoolModel | None = None) -> Backend:
    """A LangChain chat model (``invoke`` on role/content dicts); tokens from its ``usage_metadata``."""

    def call(messages: list[dict], settings: dict) -> Reply:
        message = chat_model.invoke(messages)
        usage = getattr(message, "usage_metadata", None) or {}
        content = message.content if isinstance(message.content, str) else json.dumps(message.content)
        return Reply(content, usage.get("input_tokens"), usage.get("output_tokens"))

    return Backend(name, call, spec)
