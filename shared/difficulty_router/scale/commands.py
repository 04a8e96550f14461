"""The ``--engine ray`` options of ``difficulty-router extract`` and ``serve``, kept here so the main CLI
only registers them."""

from __future__ import annotations

import argparse
from typing import Any

from difficulty_router.scale.cluster import DEFAULT_WORKER_START_TIMEOUT_S


def add_engine_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help=f"'ray': {what} on a Ray cluster (needs pip install 'difficulty-router[ray]')",
    )
    p.add_argument(
        "--ray-address", help="an existing Ray cluster ('auto' for one started with `ray start`); default: start one"
    )


def add_worker_args(p: argparse.ArgumentParser, cpus_type: type) -> None:
    p.add_argument(
        "--cpus-per-worker", type=cpus_type, default=1, help="with --engine ray: CPUs each worker holds (default 1)"
    )
    p.add_argument(
        "--worker-start-timeout",
        type=float,
        default=DEFAULT_WORKER_START_TIMEOUT_S,
        metavar="SECONDS",
        help="with --engine ray: fail with a message naming what was asked and what the cluster has when the workers "
        "cannot all be placed within this time, e.g. when no CPUs are free (default %(default)g)",
    )


def add_extract_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, "read with Ray Data, extract with a pool of actors, write Parquet shards to --output")
    p.add_argument("--workers", type=int, help="extractor actors (default: one per CPU, or per GPU when there are)")
    p.add_argument("--rows-per-shard", type=int, default=256, help="prompts per batch and Parquet shard")
    p.add_argument("--feature-cache", help="feature cache directory the workers read and write (default: the user's)")
    p.add_argument("--no-feature-cache", action="store_true", help="workers neither read nor write cached features")
    add_worker_args(p, int)


def run_extract(args, layers) -> int:
    from difficulty_router.extraction.model_store import cache_root
    from difficulty_router.scale.ray_extract import extract_distributed

    cache = None if args.no_feature_cache else (args.feature_cache or cache_root() / "features")
    shards = extract_distributed(
        args.input,
        args.output,
        model=args.model,
        gguf_file=args.gguf_file,
        layers=layers or 0.5,
        pooling=args.pooling,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        worker_start_timeout_s=args.worker_start_timeout,
        rows_per_shard=args.rows_per_shard,
        feature_cache=cache,
        address=args.ray_address,
        progress=bool(args.progress),
    )
    m = shards.manifest
    print(
        f"{m['rows']} rows -> {len(m['shards'])} Parquet shards in {args.output} (layers {m['layers']}, pooling "
        f"{'+'.join(m['pooling'])}, width {m['width']}) from {m['model_id']} on {m['workers']} workers "
        f"({m['device']}/{m['dtype']}) in {m['seconds']:.1f} s ({m['rows'] / m['seconds']:.1f} rows/s)"
    )
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--features",
        help="read the features from this directory of Parquet shards (extract --engine ray) instead of extracting",
    )
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=4.0,
        help="with --features: fit in memory up to this size, else stream mini-batches (default %(default)s)",
    )


def train_from_shard_args(args, outcomes, pool, extractor, common: dict) -> tuple[Any, str]:
    """``train --features``: the router fitted from the shards (``common``: the train options both paths
    take), and the words that say where its read-outs came from."""
    from difficulty_router.scale.shard_training import train_from_shards

    memory_budget = int(args.memory_budget_gb * (1 << 30))
    router = train_from_shards(outcomes, pool, extractor, args.features, memory_budget=memory_budget, **common)
    source = router.info["training"]["features_from"]
    return router, f"features from {args.features} ({source['mode']}); "


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, "a Ray Serve deployment with replicas and @serve.batch routing reads")
    p.add_argument("--replicas", type=int, default=1, help="with --engine ray: server replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --engine ray: CPUs each replica holds")


def run_serve(
    args, specs, router_dirs, api_key, limits, max_batch, stream_holdback=None, unsaved_routers=None, sessions=None
) -> int:
    """``serve --engine ray``. ``unsaved_routers`` (name -> router; the zero-label router of ``--pretrained``,
    built in the driver) are saved to a temporary directory first, as replicas load routers from directories:
    on a cluster of several machines, save it with ``difficulty-router pretrained`` to storage every machine
    reads and serve that directory instead. ``sessions``: the session and shadow options every replica's app
    takes (the CLI's ``session_options``)."""
    from difficulty_router.scale.cluster import ensure_ray
    from difficulty_router.scale.ray_serve import build_app, run

    router_dirs = {**router_dirs, **save_for_replicas(unsaved_routers or {})}
    ensure_ray(args.ray_address)  # before build_app, which starts the session stores on this cluster
    app = build_app(
        router_dirs,
        specs,
        replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        max_batch=max_batch,
        max_wait_s=args.max_wait_ms / 1000,
        extractor=args.extractor,
        allow_other_extractor=args.allow_other_extractor,
        decision_log=args.decision_log,
        decision_log_max_bytes=args.decision_log_max_bytes,
        ood_percentile=args.ood_percentile,
        app_options={
            "api_key": api_key,
            "allow_unauthenticated": args.allow_unauthenticated,
            "route_timeout": args.route_timeout,
            "limits": limits,
            "stream_holdback": stream_holdback,
            **(sessions or {}),
        },
    )
    print(
        f"Ray Serve: {args.replicas} replicas of routers {sorted(router_dirs)}, @serve.batch up to {max_batch} "
        f"requests or {args.max_wait_ms:g} ms; serving http://{args.host}:{args.port}/v1 "
        f"(auth {'on' if api_key else 'off'}; sessions {args.session_policy}"
        f"{shared_sessions(args)})",
        flush=True,
    )
    run(app, args.host, args.port, blocking=True)
    return 0


def shared_sessions(args) -> str:
    """How the replicas share sessions, for the start-up line."""
    if args.session_policy == "per_call":
        return ""
    if getattr(args, "session_store", None):
        from difficulty_router.routing.redis_sessions import redacted

        return f", shared by the replicas through the Redis at {redacted(args.session_store)}"
    return ", shared by the replicas through one Ray actor"


def add_label_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, "spread the pool calls over Ray workers (same journal and output; resumable by either engine)")
    p.add_argument("--workers", type=int, help="with --engine ray: worker actors (default: one per cluster CPU)")
    add_worker_args(p, float)


def ray_labeller(args, backends, config):
    """``label --engine ray``: the labeller whose calls run on Ray workers (its ``run`` is the plain one's)."""
    from difficulty_router.scale.ray_label import RayLabeller

    return RayLabeller(
        backends,
        config,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        address=args.ray_address,
        worker_start_timeout_s=args.worker_start_timeout,
    )


def save_for_replicas(routers: dict[str, Any]) -> dict[str, str]:
    """Name -> a fresh temporary directory holding that router's bundle, for replicas to load (kept after the
    command: a replica Ray restarts loads it again)."""
    import tempfile

    out = {}
    for name, router in routers.items():
        out[name] = tempfile.mkdtemp(prefix=f"difficulty-router-{name}-")
        router.save(out[name])
    return out
