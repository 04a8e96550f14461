"""The routing server on Ray Serve: the FastAPI app of ``server.app`` is the ingress of a deployment with
replicas, and routing reads are batched by ``@serve.batch`` instead of the in-process micro-batcher.

Each replica loads the routers from their saved directories (bundles, not pickled objects) and builds the
same app, so endpoints, auth, limits, escalation and errors are the plain server's. Replicas are separate
processes: ``/metrics`` answers for the replica that took the request (scrape Ray's own metrics, or each
replica, for totals); ``/health`` likewise.
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
):
    """A bound Serve application: ``replicas`` copies of the routing server over ``routers`` (name ->
    saved router directory) and backends ``specs``; ``app_options`` go to :func:`create_app` (api_key,
    limits, route_timeout, ...). Run it with :func:`run`."""
    require_ray()
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be positive, got {replicas}")
    if max_batch < 1 or max_wait_s < 0:
        raise ValueError("max_batch must be positive and max_wait_s non-negative")
    routers = {name: os.fspath(os.path.abspath(d)) for name, d in routers.items()}
    options = dict(app_options or {})
    allow_other = allow_other_extractor

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica})
    @serve.ingress()
    class RoutingServer:
        def __init__(self) -> None:
            from difficulty_router.extraction.framework_forward import pick_device
            from difficulty_router.extraction.numerics import one_path_for_many_processes
            from difficulty_router.routing.router import DifficultyRouter
            from difficulty_router.server import create_app

            dtype = one_path_for_many_processes("auto", pick_device("auto"))  # every replica on one numeric path
            self.routers = {
                name: DifficultyRouter.load(d, model=extractor, allow_other_extractor=allow_other, dtype=dtype)
                for name, d in routers.items()
            }
            self._routing_app = create_app(self.routers, specs, route_one=self.route_one, **options)

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

    return RoutingServer.bind()  # type: ignore[attr-defined]  # serve.deployment made it a Deployment


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
