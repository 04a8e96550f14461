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
:class:`~difficulty_router.routing.sessions.Sessions` (one bounded store per router). Shadow mode
(``shadow=`` a backend) routes every request but serves it with that backend; the would-be choice
goes to the record, the ``x-router-shadow-*`` headers and the ``decision_log``, and a
``shadow_sample`` share of non-streaming requests is also sent to the would-be model after the
response (a background task), its answer logged as a label.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from difficulty_router.calling.attempt import pool_cost_fn
from difficulty_router.calling.dispatch import Hooks, Reply, RoutedCall, new_query_id, run_async, shadow_plan
from difficulty_router.data.queries import clip_conversation, conversation_text, to_conversation
from difficulty_router.routing.decision_log import DecisionLog
from difficulty_router.routing.router import DifficultyRouter
from difficulty_router.routing.sessions import MAX_KEY_CHARS, SESSION_POLICIES, Sessions, SessionStore
from difficulty_router.server.backends import BackendFailure, Backends, BackendSpec
from difficulty_router.server.batching import DeadlineExceeded, MicroBatcher, QueueFull
from difficulty_router.server.guard import Guard, error_bytes
from difficulty_router.server.metrics import CONTENT_TYPE, ServerMetrics
from difficulty_router.server.schema import ApiError, Limits, parse_json, quote, read_body, validate_chat_request

logger = logging.getLogger(__name__)
DEFAULT_ROUTER_NAME = "router"
#: Characters of a conversation's tail routing reads per extractor token (tokens average about 4
#: characters in English text; twice that keeps what the extractor would read in all but odd text).
ROUTE_CHARS_PER_TOKEN = 8


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _error_response(error: ApiError, metrics: ServerMetrics, headers: dict | None = None):
    metrics.errors.inc(str(error.status), error.type)
    body = error_bytes(error.status, error.message, type=error.type, code=error.code, param=error.param)
    return Response(body, status_code=error.status, media_type="application/json", headers=headers)


def _decision_headers(
    router_name: str | None, decision, served: str, tried: list[str], routing_s: float | None
) -> dict:
    headers = {"x-router-model": served}
    if decision is None:
        headers["x-router-decision"] = "direct"
        return headers
    assert router_name is not None and routing_s is not None  # both come with a routing decision
    headers.update(
        {
            "x-router-name": router_name,
            "x-router-decision": decision.model,
            "x-router-probabilities": json.dumps(
                {m: round(p, 4) for m, p in decision.probabilities.items()}, separators=(",", ":")
            ),
            "x-router-difficulty": f"{decision.difficulty:.2f}",
            "x-router-latency-ms": f"{1000 * routing_s:.2f}",
            "x-router-truncated": "1" if decision.truncated else "0",
        }
    )
    if decision.novelty is not None:
        headers["x-router-novelty"] = f"{decision.novelty:.1f}"
        headers["x-router-ood"] = "1" if decision.ood else "0"
    if len(tried) > 1:
        headers["x-router-escalated-from"] = ",".join(tried[:-1])
    return headers


def _session_headers(decision, call: RoutedCall) -> dict:
    headers = {}
    session = getattr(decision, "session", None)
    if session is not None:
        headers["x-router-session-action"] = session["action"]
        headers["x-router-session-turn"] = str(session["turn"])
    if call.shadow is not None:
        headers["x-router-shadow-would-be"] = call.shadow["would_be"]
        headers["x-router-shadow-sampled"] = "1" if call.shadow["sampled"] else "0"
    return headers


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
    shadow: str | None = None,
    shadow_sample: float = 0.0,
    decision_log: DecisionLog | None = None,
    rng: Any = None,
    route_one: Callable[[str, list, frozenset], Awaitable[Any]] | None = None,
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
    ``shadow``: serve every routed request with this backend and only log the router's choice;
    ``shadow_sample``: the share also sent to the would-be model; ``decision_log``: where each
    routed request's decision goes (a :class:`~difficulty_router.DecisionLog`).
    ``route_one(router_name, conversation, exclude_key)``: an async function that decides one request in
    place of the in-process micro-batcher (Ray Serve's ``@serve.batch``, see ``scale.ray_serve``); the
    batching, queue bound and metrics of batches are then its own, ``route_timeout`` still applies.
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
            store=SessionStore(max_sessions=max_sessions, ttl_s=session_ttl),
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

    app = FastAPI(
        title="difficulty-router",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(authenticate)],
    )
    app.state.metrics, app.state.backends, app.state.routers = metrics, backends, routers
    app.state.api_key, app.state.allow_unauthenticated = api_key, allow_unauthenticated
    app.add_middleware(
        Guard,
        loopback_only=api_key is None and not allow_unauthenticated,
        on_error=lambda status, kind: metrics.errors.inc(str(status), kind),
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"retry-after": "1"} if exc.status == 429 else None
        return _error_response(exc, metrics, headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown paths, wrong methods
        return _error_response(
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
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

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

    def session_key(request: Request, body: dict) -> str | None:
        """The request's session: its ``X-Session-Id`` header, else its ``user`` field, else none."""
        key = request.headers.get("x-session-id")
        where = "X-Session-Id"
        if key is None:
            key, where = body.get("user"), "user"
        if key is None:
            return None
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_CHARS:
            raise ApiError(
                400, f"{where} must be a non-empty string of at most {MAX_KEY_CHARS} characters", param="user"
            )
        return key

    # the cache-aware policy prices the prompt in extractor tokens; a copy of the tokenizer (with a lock)
    # counts them, since a fast tokenizer must not be used from two threads at once (the batcher uses its own)
    tokenizers: dict[int, tuple[Any, threading.Lock]] = {}

    def count_tokens(router: DifficultyRouter, text: str) -> int:
        entry = tokenizers.get(id(router))
        if entry is None:
            entry = tokenizers.setdefault(id(router), (copy.deepcopy(router.extractor.tokenizer), threading.Lock()))
        tokenizer, lock = entry
        with lock:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def context_tokens(router: DifficultyRouter, messages: list) -> int:
        """The prompt's tokens by the extractor's tokenizer (what the cache-aware policy prices)."""
        return await asyncio.to_thread(count_tokens, router, conversation_text(to_conversation(messages)))

    async def decide(router_name: str, messages: list) -> tuple[Any, float]:
        router = routers[router_name]
        try:
            conversation = to_conversation(messages)  # validated here so one bad query cannot fail a whole batch
        except ValueError as exc:
            raise ApiError(400, str(exc).replace("query: ", "", 1), param="messages") from None
        # the extractor reads the last max_tokens tokens: a longer tail is tokenised for nothing
        conversation, clipped = clip_conversation(conversation, ROUTE_CHARS_PER_TOKEN * router.extractor.max_tokens)
        down = {m: why for m, why in backends.down().items() if m in router.models}
        if len(down) == len(router.models):
            down = {}  # everything is down: try them anyway rather than refuse outright
        start = time.perf_counter()
        try:
            if route_one is None:
                decision = await batchers[router_name].submit(conversation, frozenset(down.items()))
            else:
                try:
                    decision = await asyncio.wait_for(
                        route_one(router_name, conversation, frozenset(down.items())), route_timeout
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

    def failed(requested: str, failures: list[BaseException]) -> ApiError:
        metrics.requests.inc(requested, "none")
        backend_failures = [f for f in failures if isinstance(f, BackendFailure)]
        last = backend_failures[-1]
        if not last.escalate:  # the backend refused the request itself: pass its verdict on
            return ApiError(last.status, last.detail, param=None, code="backend_rejected_request")
        detail = "; ".join(str(f) for f in backend_failures)
        status = 504 if all(f.kind == "timeout" for f in backend_failures) else 502
        return ApiError(
            status, f"every candidate backend failed: {detail}", type="api_error", code="backends_unavailable"
        )

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
            decision, routing_s = await decide(requested, body["messages"])
            key = session_key(request, body)
            policy = sessions[requested]
            if key is not None and policy.policy != "per_call":
                tokens = await context_tokens(routers[requested], body["messages"])
                decision = policy.apply(key, decision, context_tokens=tokens)
            pool = getattr(routers[requested], "pool", None)
            cost_fn = pool_cost_fn(pool) if pool is not None else None
            shadow_info = None
            if shadow is not None:
                sampled = not streaming and decision.model != shadow and rng.random() < shadow_sample
                shadow_info = shadow_plan(shadow, decision, sampled)
            query_id = new_query_id() if decision_log is not None else None  # the key a later grade is joined on
            call = RoutedCall(decision=decision, cost_fn=cost_fn, shadow=shadow_info, query_id=query_id)
            call.sample_inline = False  # the server asks the alternative after responding (a background task)
        elif requested in backends:
            call = RoutedCall(ladder=[requested])
        else:
            raise ApiError(
                404,
                f"The model {quote(requested)} does not exist; available: {[*routers, *backends.names]}",
                param="model",
                code="model_not_found",
            )

        async def invoke(name: str) -> Reply:
            if streaming:
                return Reply(await backends.stream(name, body))
            data = await backends.complete(name, body)
            usage = data.get("usage") or {}
            return Reply(
                data,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )

        try:
            reply = await run_async(call, invoke, hooks)
        except BackendFailure as exc:
            errors = call.errors if any(e is exc for e in call.errors) else [*call.errors, exc]
            raise failed(requested, errors) from None
        served = call.served
        assert served is not None  # run_async returns only once a backend has served the call
        name = served.model
        metrics.requests.inc(requested, name)
        if decision is not None and key is not None and shadow is None:
            sessions[requested].served(key, name)
        tried = [a.model for a in call.attempts]
        headers = _decision_headers(requested if decision else None, decision, name, tried, routing_s)
        headers.update(_session_headers(decision, call))
        if call.query_id is not None:
            headers["x-router-query-id"] = call.query_id
        after = None
        if decision is not None and (decision_log is not None or call.sample_alternative is not None):
            after = BackgroundTask(_after, call, body, requested)
        if streaming:
            first, rest, close = reply.value
            return StreamingResponse(
                _relay(first, rest, close, name), media_type="text/event-stream", headers=headers, background=after
            )
        data = reply.value
        data["model"] = name
        data["router"] = {"requested": requested, **call.record()}
        return JSONResponse(data, headers=headers, background=after)

    async def _after(call: RoutedCall, body: dict, requested: str) -> None:
        """After the response: ask the sampled alternative (shadow mode) and write the decision log."""
        alternative = call.sample_alternative
        if alternative is not None:
            try:
                data = await backends.complete(alternative, {**body, "stream": False})
                usage = data.get("usage") or {}
                message = (data.get("choices") or [{}])[0].get("message") or {}
                call.alternative_reply = Reply(
                    data,
                    text=str(message.get("content") or ""),
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
            except Exception as exc:  # noqa: BLE001 - a label we could not collect is logged, never raised
                call.alternative_failed(exc)
        if decision_log is not None:
            await asyncio.to_thread(call.log_to, decision_log, body["messages"], routers[requested])

    async def _relay(first, rest, close, name: str):
        try:
            if first is not None:
                first["model"] = name
                yield _sse(first)
            async for chunk in rest:
                chunk["model"] = name
                yield _sse(chunk)
        except Exception as exc:  # noqa: BLE001 (headers are sent: report in-band, as OpenAI does)
            logger.warning("stream from %s broke: %s", name, exc)
            metrics.backend_errors.inc(name, "stream_broken")
            yield _sse(
                ApiError(502, f"{name}: the stream broke; the server log has the cause", type="api_error").body()
            )
        finally:
            await close()
        yield b"data: [DONE]\n\n"

    return app
