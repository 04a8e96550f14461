"""The OpenAI-compatible routing server: ``create_app(routers, backends)`` returns a FastAPI app.

``POST /v1/chat/completions`` with ``model`` set to a router's name (``router`` by default)
routes the conversation and forwards the request, unchanged except for ``model``, to the
chosen backend; a backend's own name bypasses routing. Backend failures escalate along the
decision's ``fallbacks`` (more capable models); the client sees an error only when every
candidate failed. The decision travels in ``x-router-*`` headers and in the body's ``model``
(the backend that answered) and ``router`` fields, so unmodified OpenAI clients work and
curious ones can read why.

At the door, :class:`~.schema.Limits` bound what one request may hold, the routing queue is
bounded (429 when full, 503 when a request's routing deadline passes), prompts longer than the
extractor can read are clipped to their tail before routing (the extractor keeps the last
tokens anyway), and every error is OpenAI-shaped with an ``x-request-id`` (see :mod:`.guard`).

Sessions: a request's ``X-Session-Id`` header, else its ``user`` field, names its session; under
``session_policy`` ``sticky`` or ``cache_aware`` its turns are decided by
:class:`~difficulty_router.routing.sessions.Sessions` (one bounded store per router, in this process unless
``session_store`` gives a shared one: Redis, ``routing.redis_sessions``; a store that cannot be reached
answers the request with a 503). Shadow mode
(``shadow=`` a backend) routes every request but serves it with that backend; the would-be choice
goes to the record, the ``x-router-shadow-*`` headers and the ``decision_log``, and a
``shadow_sample`` share of non-streaming requests is also sent to the would-be model after the
response (a background task), its answer logged as a label.

This module is the app's shape: its arguments checked, its endpoints, and the chat handler that
ties one request together. The pieces it ties live beside it: one request's routing decision in
:mod:`.deciding`, headers, the SSE relay and errors in :mod:`.responses`, the work after a response in
:mod:`.follow_up`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from difficulty_router.calling.attempt import pool_cost_fn
from difficulty_router.calling.dispatch import (
    Hooks,
    Reply,
    RoutedCall,
    StreamHoldback,
    new_query_id,
    run_async,
    shadow_plan,
    stream_async,
)
from difficulty_router.routing.decision_log import DecisionLog
from difficulty_router.routing.router import DifficultyRouter
from difficulty_router.routing.sessions import (
    SESSION_POLICIES,
    Sessions,
    SessionStates,
    SessionStore,
    SessionStoreUnavailable,
)
from difficulty_router.server.backends import BackendFailure, Backends, BackendSpec
from difficulty_router.server.batching import MicroBatcher
from difficulty_router.server.deciding import (
    RequestRouting,
    every_backend_failed,
    session_key,
)
from difficulty_router.server.follow_up import follow_up
from difficulty_router.server.guard import Guard
from difficulty_router.server.metrics import CONTENT_TYPE, ServerMetrics
from difficulty_router.server.responses import (
    decision_headers,
    error_response,
    relay,
    session_headers,
    store_unavailable,
)
from difficulty_router.server.schema import ApiError, Limits, parse_json, quote, read_body, validate_chat_request

logger = logging.getLogger(__name__)
DEFAULT_ROUTER_NAME = "router"


def create_app(
    routers: DifficultyRouter | Mapping[str, DifficultyRouter],
    backends: Backends | list[BackendSpec],
    *,
    api_key: str | None = None,
    allow_unauthenticated: bool = False,
    max_batch: int = 32,
    max_wait: float = 0.005,
    max_queue: int = 1024,
    route_timeout: float | None = 30.0,
    limits: Limits | None = None,
    metrics: ServerMetrics | None = None,
    session_policy: str = "per_call",
    session_ttl: float = 3600.0,
    max_sessions: int = 10_000,
    session_margin: float = 0.05,
    allow_deescalation: bool = False,
    session_store: Callable[[str], SessionStates] | None = None,
    shadow: str | None = None,
    shadow_sample: float = 0.0,
    decision_log: DecisionLog | None = None,
    rng: Any = None,
    route_one: Callable[[str, list, frozenset], Awaitable[Any]] | None = None,
    stream_holdback: StreamHoldback | None = None,
    metrics_text: Callable[[], Awaitable[str]] | None = None,
):
    """Build the ASGI app.

    ``routers``: one router (served as ``router``) or a mapping name -> router. ``backends``:
    a :class:`Backends` or the specs to build one from; every model a router can choose needs
    a backend. ``api_key``: when set, every endpoint but ``/health`` requires
    ``Authorization: Bearer <api_key>``; without one the app answers loopback clients only,
    unless ``allow_unauthenticated`` (a proxy in front authenticates). ``max_batch`` /
    ``max_wait`` (seconds) bound the micro-batches (``max_batch=1`` decides requests one by
    one); ``max_queue`` requests may wait for routing (then 429) for ``route_timeout``
    seconds (then 503). ``limits``: what one request may hold (default :class:`Limits`).
    ``session_policy`` (one of ``per_call``, ``sticky``, ``cache_aware``), ``session_ttl``,
    ``max_sessions``, ``session_margin``, ``allow_deescalation``: session routing (module docstring).
    ``session_store(router_name)``: the store of that router's sessions when processes share them (Redis:
    ``routing.redis_sessions.RedisSessionStores``; Ray Serve's replicas by default: ``scale.ray_sessions``); its
    own TTL and bound then hold, and ``session_ttl`` / ``max_sessions`` are not used. Default: a
    :class:`SessionStore` in this process.
    ``shadow``: serve every routed request with this backend and only log the router's choice;
    ``shadow_sample``: the share also sent to the would-be model; ``decision_log``: where each
    routed request's decision goes (a :class:`~difficulty_router.DecisionLog`).
    ``route_one(router_name, conversation, exclude_key)``: an async function that decides one request in
    place of the in-process micro-batcher (Ray Serve's ``@serve.batch``, see ``scale.ray_serve``); the
    batching, queue bound and metrics of batches are then its own, ``route_timeout`` still applies.
    ``stream_holdback``: hold each stream back this long before the client sees it, so a backend that
    breaks meanwhile escalates unseen (:class:`~difficulty_router.StreamHoldback`; default: commit at
    the first chunk).
    ``metrics_text``: an async function whose text ``/metrics`` answers in place of ``metrics.render()`` (the
    totals of every Ray Serve replica, ``scale.ray_metrics``); kept as ``app.state.metrics_text``, read at
    each scrape, so a wrapper that builds the app may set it afterwards. Default: this app's own metrics.
    """
    limits = limits or Limits()
    if isinstance(routers, DifficultyRouter):
        routers = {DEFAULT_ROUTER_NAME: routers}
    routers = dict(routers)
    if not routers:
        raise ValueError("give at least one router")
    if not isinstance(backends, Backends):
        backends = Backends(backends)
    for name, router in routers.items():
        if name in backends:
            raise ValueError(f"router name {name!r} is also a backend name; requests could not tell them apart")
        missing = [m for m in router.models if m not in backends]
        if missing:
            raise ValueError(
                f"router {name!r} can choose {missing}, which have no backend (backends: {backends.names})"
            )
    if session_policy not in SESSION_POLICIES:
        raise ValueError(f"unknown session policy {session_policy!r}; expected one of {SESSION_POLICIES}")
    sessions = {
        name: Sessions(
            session_policy,
            store=session_store(name) if session_store else SessionStore(max_sessions=max_sessions, ttl_s=session_ttl),
            margin=session_margin,
            allow_deescalation=allow_deescalation,
        )
        for name in routers
    }
    for name, router in routers.items():
        sessions[name].bind(router)
    if shadow is not None and shadow not in backends:
        raise ValueError(f"shadow={shadow!r} is not a backend (backends: {backends.names})")
    if isinstance(shadow_sample, bool) or not 0 <= shadow_sample <= 1 or (shadow_sample and shadow is None):
        raise ValueError(f"shadow_sample must be a share in [0, 1], and needs shadow=; got {shadow_sample!r}")
    if stream_holdback is not None and not isinstance(stream_holdback, StreamHoldback):
        raise TypeError(f"stream_holdback must be a StreamHoldback, got {type(stream_holdback).__name__}")
    if decision_log is not None and not isinstance(decision_log, DecisionLog):
        raise TypeError(f"decision_log must be a DecisionLog, got {type(decision_log).__name__}")
    import random

    rng = rng if rng is not None else random.Random()
    metrics = metrics or ServerMetrics()
    server_metrics: ServerMetrics = metrics  # mypy does not carry the narrowing into BackendHooks below

    def batch_fn(router: DifficultyRouter):
        def decide(conversations: list, exclude_key) -> list:
            return router.route_batch(conversations, exclude=dict(exclude_key) or None, progress=False)

        return decide

    batchers = (
        {}
        if route_one is not None
        else {
            name: MicroBatcher(
                batch_fn(r),
                max_batch=max_batch,
                max_wait=max_wait,
                max_queue=max_queue,
                timeout=route_timeout,
                on_batch=metrics.observe_batch,
                name=name,
            )
            for name, r in routers.items()
        }
    )

    def queue_depth(batcher: MicroBatcher) -> Callable[[], int]:
        return lambda: batcher.depth

    for name, batcher in batchers.items():
        metrics.track_queue(name, queue_depth(batcher))

    async def authenticate(request: Request) -> None:
        if api_key is None or request.url.path == "/health":
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    @asynccontextmanager
    async def lifespan(app):
        await backends.start()
        try:
            yield
        finally:
            for batcher in batchers.values():
                await batcher.aclose()
            await backends.aclose()
            for policy in sessions.values():  # a shared store's client (Redis) lets its connections go
                close = getattr(policy.store, "close", None)
                if callable(close):
                    await asyncio.to_thread(close)

    app = FastAPI(
        title="difficulty-router",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(authenticate)],
    )
    app.state.metrics, app.state.backends, app.state.routers = metrics, backends, routers
    app.state.metrics_text = metrics_text
    app.state.api_key, app.state.allow_unauthenticated = api_key, allow_unauthenticated
    app.add_middleware(
        Guard,
        loopback_only=api_key is None and not allow_unauthenticated,
        on_error=lambda status, kind: metrics.errors.inc(str(status), kind),
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"retry-after": "1"} if exc.status == 429 else None
        return error_response(exc, metrics, headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown paths, wrong methods
        return error_response(
            ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None), metrics
        )

    @app.get("/health")
    async def health():
        down = backends.down()
        return {
            "status": "ok",
            "routers": list(routers),
            "backends": {n: ("down" if n in down else "up") for n in backends.names},
        }

    @app.get("/metrics")
    async def prometheus():
        source = app.state.metrics_text
        return PlainTextResponse(await source() if source else metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "difficulty-router", "models": list(r.models)}
            for name, r in routers.items()
        ]
        data += [
            {"id": n, "object": "model", "created": 0, "owned_by": "difficulty-router-backend"} for n in backends.names
        ]
        return {"object": "list", "data": data}

    routing = RequestRouting(routers, backends, metrics, batchers, route_one, route_timeout)

    class BackendHooks(Hooks):
        """Metrics and logs per attempt; the escalation itself is the dispatch core's."""

        def error(self, call: RoutedCall, handle: Any, attempt: Any, exc: BaseException) -> None:
            model = attempt.model if attempt is not None else getattr(exc, "backend", "?")
            server_metrics.backend_errors.inc(model, getattr(exc, "kind", "error"))
            if attempt is not None and call.next_model is not None and call.next_model != model:
                server_metrics.escalations.inc(model, call.next_model)
                logger.warning("%s; escalating to %s", exc, call.next_model)

    hooks = BackendHooks()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = validate_chat_request(parse_json(await read_body(request, limits.max_body_bytes), limits), limits)
        requested = body["model"]
        decision, routing_s, cost_fn, key = None, None, None, None
        streaming = bool(body.get("stream"))
        if requested in routers:
            decision, routing_s = await routing.decide(requested, body["messages"])
            key = session_key(request, body)
            policy = sessions[requested]
            if key is not None and policy.policy != "per_call":
                tokens = await routing.context_tokens(routers[requested], body["messages"])
                try:
                    decision = await off_loop_if_blocking(policy, policy.apply, key, decision, context_tokens=tokens)
                except SessionStoreUnavailable as exc:
                    raise store_unavailable(exc, request) from None
            pool = getattr(routers[requested], "pool", None)
            cost_fn = pool_cost_fn(pool) if pool is not None else None
            shadow_info = None
            if shadow is not None:
                sampled = not streaming and decision.model != shadow and rng.random() < shadow_sample
                shadow_info = shadow_plan(shadow, decision, sampled)
            query_id = new_query_id() if decision_log is not None else None  # the key a later grade is joined on
            call = RoutedCall(
                decision=decision, cost_fn=cost_fn, shadow=shadow_info, query_id=query_id, holdback=stream_holdback
            )
            call.sample_inline = False  # the server asks the alternative after responding (a background task)
        elif requested in backends:
            call = RoutedCall(ladder=[requested], holdback=stream_holdback)
        else:
            raise ApiError(
                404,
                f"The model {quote(requested)} does not exist; available: {[*routers, *backends.names]}",
                param="model",
                code="model_not_found",
            )

        async def invoke(name: str) -> Reply:
            data = await backends.complete(name, body)
            usage = data.get("usage") or {}
            return Reply(
                data,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )

        try:
            if streaming:  # the dispatch core reads up to the commit point: a failure before it escalates
                opened = await stream_async(call, lambda name: backends.stream(name, body), Reply, hooks)
            else:
                reply = await run_async(call, invoke, hooks)
        except BackendFailure as exc:
            errors = call.errors if any(e is exc for e in call.errors) else [*call.errors, exc]
            raise every_backend_failed(requested, errors, metrics) from None
        served = call.served
        assert served is not None  # run_async returns only once a backend has served the call
        name = served.model
        metrics.requests.inc(requested, name)
        if decision is not None and key is not None and shadow is None:
            policy = sessions[requested]
            try:
                await off_loop_if_blocking(policy, policy.served, key, name)
            except SessionStoreUnavailable as exc:  # the answer is here: serve it; the next turn may move
                logger.warning("the session %r could not record that %s served it: %s", key, name, exc)
        tried = [a.model for a in call.attempts]
        headers = decision_headers(requested if decision else None, decision, name, tried, routing_s)
        headers.update(session_headers(decision, call))
        if call.query_id is not None:
            headers["x-router-query-id"] = call.query_id
        after = None
        if decision is not None and (decision_log is not None or call.sample_alternative is not None):
            after = BackgroundTask(follow_up, call, body, backends, decision_log, routers[requested])
        if streaming:
            return StreamingResponse(
                relay(opened.head, opened.tail, name),
                media_type="text/event-stream",
                headers=headers,
                background=after,
            )
        data = reply.value
        data["model"] = name
        data["router"] = {"requested": requested, **call.record()}
        return JSONResponse(data, headers=headers, background=after)

    return app


async def off_loop_if_blocking(sessions: Sessions, method: Callable[..., Any], *args, **kwargs) -> Any:
    """Call a method of ``sessions``; off the event loop when its store waits on another process (a shared
    store's round trip would otherwise stall every request of this process)."""
    if sessions.store.blocking:
        return await asyncio.to_thread(method, *args, **kwargs)
    return method(*args, **kwargs)
