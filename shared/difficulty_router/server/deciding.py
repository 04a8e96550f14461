"""One request's routing decision: validate and clip the conversation, batch it, bound the wait, count it.

The app's handler asks :class:`RequestRouting` for a decision and gets either one (with the time it
took) or an OpenAI-shaped :class:`~.schema.ApiError`: 400 for a conversation the router cannot read,
429 when the routing queue is full, 503 when the routing deadline passed. Backends that are down are
excluded from the decision (unless every one is). Also here: which session a request belongs to, the
prompt's length in the extractor's tokens for the cache-aware session policy, and the error a
request gets when every candidate backend failed.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import Request

from difficulty_router.data.queries import clip_conversation, conversation_text, to_conversation
from difficulty_router.routing.router import DifficultyRouter
from difficulty_router.routing.sessions import MAX_KEY_CHARS
from difficulty_router.server.backends import BackendFailure, Backends
from difficulty_router.server.batching import DeadlineExceeded, MicroBatcher, QueueFull
from difficulty_router.server.metrics import ServerMetrics
from difficulty_router.server.schema import ApiError

#: Characters of a conversation's tail routing reads per extractor token (tokens average about 4
#: characters in English text; twice that keeps what the extractor would read in all but odd text).
ROUTE_CHARS_PER_TOKEN = 8


def clip_for_routing(conversation: list, max_chars: int) -> tuple[list, bool]:
    """The conversation's last ``max_chars`` characters (:func:`clip_conversation`), never a blank tail.

    Text followed by a long run of whitespace (a blank tool output, a padded paste) clips to whitespace
    alone, which the router refuses as an empty conversation: a valid request then failed with a 500, and
    so did every request batched with it (found by the valid-body fuzz, issue 31). Such a tail is read
    without its trailing whitespace and blank messages instead; no information is lost, since whitespace
    carries none, and nothing longer than ``max_chars`` is ever tokenised.
    """
    clipped, cut = clip_conversation(conversation, max_chars)
    if cut and not any(m["content"].strip() for m in clipped):
        trimmed = [{**m, "content": m["content"].rstrip()} for m in conversation if m["content"].strip()]
        clipped, _ = clip_conversation(trimmed, max_chars)
    return clipped, cut


class RequestRouting:
    """Decisions for the app's requests, through the micro-batchers or an outside ``route_one``."""

    def __init__(
        self,
        routers: Mapping[str, DifficultyRouter],
        backends: Backends,
        metrics: ServerMetrics,
        batchers: Mapping[str, MicroBatcher],
        route_one: Callable[[str, list, frozenset], Awaitable[Any]] | None,
        route_timeout: float | None,
    ) -> None:
        self.routers, self.backends, self.metrics = routers, backends, metrics
        self.batchers, self.route_one, self.route_timeout = batchers, route_one, route_timeout
        # the cache-aware policy prices the prompt in extractor tokens; a copy of the tokenizer (with a lock)
        # counts them, since a fast tokenizer must not be used from two threads at once (the batcher uses its own)
        self._tokenizers: dict[int, tuple[Any, threading.Lock]] = {}

    async def decide(self, router_name: str, messages: list) -> tuple[Any, float]:
        """The router's decision for ``messages`` and the seconds it took."""
        router, metrics, route_timeout = self.routers[router_name], self.metrics, self.route_timeout
        try:
            conversation = to_conversation(messages)  # validated here so one bad query cannot fail a whole batch
        except ValueError as exc:
            raise ApiError(400, str(exc).replace("query: ", "", 1), param="messages") from None
        # the extractor reads the last max_tokens tokens: a longer tail is tokenised for nothing
        conversation, clipped = clip_for_routing(conversation, ROUTE_CHARS_PER_TOKEN * router.extractor.max_tokens)
        down = {m: why for m, why in self.backends.down().items() if m in router.models}
        if len(down) == len(router.models):
            down = {}  # everything is down: try them anyway rather than refuse outright
        start = time.perf_counter()
        try:
            if self.route_one is None:
                decision = await self.batchers[router_name].submit(conversation, frozenset(down.items()))
            else:
                try:
                    decision = await asyncio.wait_for(
                        self.route_one(router_name, conversation, frozenset(down.items())), route_timeout
                    )
                except TimeoutError:
                    raise DeadlineExceeded(f"not decided within {route_timeout:g} s") from None
        except QueueFull:
            metrics.shed.inc(router_name, "queue_full")
            raise ApiError(
                429,
                f"router {router_name!r} is busy: too many requests are waiting to be routed; retry shortly",
                type="rate_limit_error",
                code="router_queue_full",
            ) from None
        except DeadlineExceeded:
            metrics.shed.inc(router_name, "deadline")
            metrics.deadline_expiries.inc(router_name)
            raise ApiError(
                503,
                f"router {router_name!r} could not route the request in time ({route_timeout:g} s); retry shortly",
                type="server_error",
                code="routing_timeout",
            ) from None
        if clipped:
            decision = dataclasses.replace(decision, truncated=True)
        elapsed = time.perf_counter() - start
        metrics.routing_latency.observe(elapsed)
        metrics.routed.inc(router_name, decision.model)
        if decision.ood:
            metrics.ood_escalations.inc(router_name, decision.model)
        return decision, elapsed

    def _count_tokens(self, router: DifficultyRouter, text: str) -> int:
        entry = self._tokenizers.get(id(router))
        if entry is None:
            entry = self._tokenizers.setdefault(
                id(router), (copy.deepcopy(router.extractor.tokenizer), threading.Lock())
            )
        tokenizer, lock = entry
        with lock:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def context_tokens(self, router: DifficultyRouter, messages: list) -> int:
        """The prompt's tokens by the extractor's tokenizer (what the cache-aware policy prices)."""
        return await asyncio.to_thread(self._count_tokens, router, conversation_text(to_conversation(messages)))


def session_key(request: Request, body: dict) -> str | None:
    """The request's session: its ``X-Session-Id`` header, else its ``user`` field, else none."""
    key = request.headers.get("x-session-id")
    where = "X-Session-Id"
    if key is None:
        key, where = body.get("user"), "user"
    if key is None:
        return None
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_CHARS:
        raise ApiError(400, f"{where} must be a non-empty string of at most {MAX_KEY_CHARS} characters", param="user")
    return key


def every_backend_failed(requested: str, failures: list[BaseException], metrics: ServerMetrics) -> ApiError:
    """The error for a request no candidate backend could serve (counted as served by 'none')."""
    metrics.requests.inc(requested, "none")
    backend_failures = [f for f in failures if isinstance(f, BackendFailure)]
    last = backend_failures[-1]
    if not last.escalate:  # the backend refused the request itself: pass its verdict on
        return ApiError(last.status, last.detail, param=None, code="backend_rejected_request")
    detail = "; ".join(str(f) for f in backend_failures)
    status = 504 if all(f.kind == "timeout" for f in backend_failures) else 502
    return ApiError(status, f"every candidate backend failed: {detail}", type="api_error", code="backends_unavailable")
