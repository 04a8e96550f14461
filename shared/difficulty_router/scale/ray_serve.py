"""The routing server on Ray Serve: the FastAPI app of ``server.app`` is the ingress of a deployment with
replicas, and routing reads are batched by ``@serve.batch`` instead of the in-process micro-batcher.

Each replica loads the routers from their saved directories (bundles, not pickled objects) and builds the
same app, so endpoints, auth, limits, escalation and errors are the plain server's. Replicas are separate
processes: ``/metrics`` on any replica answers the totals of every replica still reporting, through one
named metrics actor per application (:mod:`.ray_metrics`: each replica sends its counts every second and
before it answers a scrape; a replica silent for longer than ``ray_metrics.STALE_AFTER_S`` drops out of
the totals; ``difficulty_router_replicas_reporting`` says how many are in them, and
``difficulty_router_metrics_merged 0`` marks a replica that could not reach the actor and answered its
own counts). ``/health`` answers for the replica that took the request. Each response names its replica
in ``x-router-replica``.

Sessions (a ``session_policy`` other than ``per_call``) are shared by every replica: the driver starts one
named Ray actor per router that holds the states (:mod:`.ray_sessions`), and each replica's sessions read
and write it, so a conversation keeps its model whichever replica takes a turn. A ``decision_log`` likewise
has one writer actor that every replica's records go to (:mod:`.ray_decision_log`).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from difficulty_router.scale.cluster import ensure_ray, require_ray

APP_NAME = "difficulty-router"


def build_app(
    routers: dict[str, str],
    specs: list,
    *,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    max_batch: int = 1,
    max_wait_s: float = 0.005,
    extractor: str | None = None,
    allow_other_extractor: bool = False,
    app_options: dict[str, Any] | None = None,
    app_name: str = APP_NAME,
    decision_log: str | os.PathLike | None = None,
    decision_log_max_bytes: int | None = None,
    ood_percentile: float | None = None,
):
    """A bound Serve application: ``replicas`` copies of the routing server over ``routers`` (name ->
    saved router directory) and backends ``specs``; ``app_options`` go to :func:`create_app` (api_key,
    limits, route_timeout, session_policy, session_ttl, max_sessions, ...). Run it with :func:`run`, or deploy
    it under ``app_name``, which also names its shared actors, started here (a local Ray cluster too, when
    none is up): the metrics actor, and the session stores (one per router) when ``session_policy`` is not
    ``per_call`` and no ``session_store`` is given. ``decision_log``: the file every replica's
    decisions go to, through one writer actor started here on this node (rotated at ``decision_log_max_bytes``).
    ``ood_percentile``: each replica's routers send queries more novel than this percentile to the most
    capable model (``OODPolicy``), as ``serve --ood-percentile`` does."""
    require_ray()
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be positive, got {replicas}")
    if max_batch < 1 or max_wait_s < 0:
        raise ValueError("max_batch must be positive and max_wait_s non-negative")
    routers = {name: os.fspath(os.path.abspath(d)) for name, d in routers.items()}
    options = dict(app_options or {})
    ensure_ray()  # the shared actors below (metrics always; sessions, decision log) live on the cluster
    store_names = _start_session_stores(app_name, routers, options)
    log_name = None
    if decision_log is not None:
        from difficulty_router.scale.ray_decision_log import decision_log_name, start_decision_log

        log_name = decision_log_name(app_name)
        start_decision_log(log_name, decision_log, max_bytes=decision_log_max_bytes)
    from difficulty_router.scale.ray_metrics import metrics_board_name, start_metrics_board

    board_name = metrics_board_name(app_name)
    start_metrics_board(board_name)  # metrics/<app_name>: one /metrics over the replicas (ray_metrics)
    allow_other = allow_other_extractor

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica})
    @serve.ingress()
    class RoutingServer:
        def __init__(self) -> None:
            from difficulty_router.extraction.framework_forward import pick_device
            from difficulty_router.extraction.numerics import one_path_for_many_processes
            from difficulty_router.learning.novelty import OODPolicy
            from difficulty_router.routing.router import DifficultyRouter
            from difficulty_router.scale.ray_decision_log import RayDecisionLog
            from difficulty_router.scale.ray_sessions import RaySessionStore
            from difficulty_router.server import create_app

            dtype = one_path_for_many_processes("auto", pick_device("auto"))  # every replica on one numeric path
            self.routers = {
                name: DifficultyRouter.load(d, model=extractor, allow_other_extractor=allow_other, dtype=dtype)
                for name, d in routers.items()
            }
            for name, router in self.routers.items():
                if ood_percentile is not None:
                    if router.novelty is None:
                        raise ValueError(f"ood_percentile: router {name!r} was saved without a novelty score")
                    router.ood = OODPolicy(enabled=True, percentile=ood_percentile)
            log = RayDecisionLog(log_name) if log_name is not None else None
            stores = {name: RaySessionStore(store) for name, store in store_names.items()}
            # the actors' stores; else the store options name (Redis: each replica opens its own client), or None
            shared = stores.__getitem__ if stores else options.get("session_store")
            self._routing_app = create_app(
                self.routers,
                specs,
                route_one=self.route_one,
                decision_log=log,
                **{**options, "session_store": shared},
            )
            replica = serve.get_replica_context().replica_id.unique_id
            self._routing_app.add_middleware(ReplicaHeader, replica=replica)
            from difficulty_router.scale.ray_metrics import ReplicaMetrics

            app_state = self._routing_app.state
            group = serve.get_replica_context().app_name  # apps built under one app_name keep separate totals
            self._shared_metrics = ReplicaMetrics(app_state.metrics, board_name, group, replica)
            app_state.metrics_text = self._shared_metrics.text  # /metrics: the totals of every replica
            self._shared_metrics.start()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_s)
        async def _route(self, items: list[tuple[str, list, frozenset]]) -> list:
            """One forward pass per (router, excluded backends) group of the batch, off the event loop."""
            groups: dict[tuple[str, frozenset], list[int]] = {}
            for i, (name, _conversation, key) in enumerate(items):
                groups.setdefault((name, key), []).append(i)
            out: list = [None] * len(items)
            for (name, key), positions in groups.items():
                decisions = await asyncio.to_thread(
                    self.routers[name].route_batch,
                    [items[i][1] for i in positions],
                    exclude=dict(key) or None,
                    progress=False,
                )
                for i, decision in zip(positions, decisions, strict=True):
                    out[i] = decision
            return out

        async def route_one(self, name: str, conversation: list, key: frozenset):
            return await self._route((name, conversation, key))

        def __serve_build_asgi_app__(self):
            return self._routing_app

        def __del__(self) -> None:  # Serve calls it when the replica stops: its snapshots stop
            shared = getattr(self, "_shared_metrics", None)
            if shared is not None:
                shared.close()

    return RoutingServer.bind()  # type: ignore[attr-defined]  # serve.deployment made it a Deployment


def _start_session_stores(app_name: str, routers: dict[str, str], options: dict[str, Any]) -> dict[str, str]:
    """Router name -> the name of its session store actor, started now; none under ``per_call``, nor when
    ``options`` name a ``session_store`` (Redis: ``routing.redis_sessions.RedisSessionStores``, which holds its
    own bounds). The store's bounds leave ``options``: the actor holds them."""
    if options.get("session_policy", "per_call") == "per_call" or options.get("session_store") is not None:
        return {}
    from difficulty_router.scale.ray_sessions import session_store_name, start_session_store

    bounds = {"max_sessions": options.pop("max_sessions", 10_000), "ttl_s": options.pop("session_ttl", 3600.0)}
    names = {router: session_store_name(app_name, router) for router in routers}
    for name in names.values():
        start_session_store(name, **bounds)
    return names


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that served it (``x-router-replica``), so a
    client or a test can see which replica took each turn."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (b"x-router-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, send_named)


def run(app, host: str = "127.0.0.1", port: int = 8000, *, blocking: bool = False, address: str | None = None):
    """Start Serve's HTTP proxy on ``host:port`` and deploy ``app`` at ``/``; returns the base URL."""
    ensure_ray(address)
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
