"""``difficulty-router route`` (one decision, printed) and ``serve`` (an OpenAI-compatible endpoint that routes
each request), with serve's options for sessions, shadow mode and the decision log. Together because both put
a saved or zero-label router to use on live queries. Nothing from the server extra is imported until ``serve``
runs, so ``--help`` works without it; the work is in :mod:`difficulty_router.server`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from difficulty_router.cli.common import (
    extractor_args,
    extractor_choice,
    load_router_or_pretrained,
    pool_from_spec,
    pretrained_arg,
    transfer_guard_choice,
)
from difficulty_router.routing.sessions import SESSION_POLICIES


def cmd_route(args) -> int:
    router = load_router_or_pretrained(args, args.router)
    query = args.query
    if args.messages:
        query = json.loads(args.query)
    decision = router.route(query)
    if args.verbose:
        path = router.extractor.numeric_path
        summary = path.choice.summary() if path.choice is not None else f"numeric path {path.name} ({path.how})"
        print(summary, file=sys.stderr)
    print(json.dumps(decision.to_dict(), indent=1) if args.json else str(decision))
    return 0


def _router_dirs(values: list[str]) -> dict[str, str]:
    """``DIR`` (served as ``router``) or ``NAME=DIR``, repeatable."""
    from difficulty_router.server.app import DEFAULT_ROUTER_NAME

    out: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep:
            name, directory = DEFAULT_ROUTER_NAME, value
        if not name or not directory:
            raise ValueError(f"--router {value!r}: expected DIR or NAME=DIR")
        if name in out:
            raise ValueError(f"--router: the name {name!r} is given twice")
        out[name] = directory
    return out


def cmd_serve(args) -> int:
    import os

    from difficulty_router.core.pool import ModelPool
    from difficulty_router.routing.router import DifficultyRouter

    try:
        from difficulty_router.server import create_app, specs_from_pool
        from difficulty_router.server.run import check_exposure, serve
    except ImportError as exc:
        raise ValueError(
            f"the server needs its extra ({exc.name} is missing): pip install 'difficulty-router[server]'"
        ) from None

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    check_exposure(args.host, api_key, args.allow_unauthenticated)
    stores = session_store_choice(args)  # refuses a bad --session-store, or an unreachable one, before loading
    holdback = stream_holdback(args)  # refuses a negative hold-back before loading anything
    specs = specs_from_pool(ModelPool.load(args.pool))  # refuses a pool without base_urls before loading anything
    routers = {
        name: DifficultyRouter.load(d, **extractor_choice(args)) for name, d in _router_dirs(args.router or []).items()
    }
    if args.pretrained is not None:  # the zero-label router for the served pool (or the pool --pretrained names)
        routers = with_pretrained_router(args, routers)
    if not routers:
        raise ValueError("give --router DIR (or NAME=DIR), or --pretrained")
    if args.ood_percentile is not None:
        from difficulty_router.learning.novelty import OODPolicy

        for name, router in routers.items():
            if router.novelty is None:
                raise ValueError(f"--ood-percentile: router {name!r} was saved without a novelty score; retrain it")
            router.ood = OODPolicy(enabled=True, percentile=args.ood_percentile)
    max_batch = args.max_batch
    if max_batch is None:  # measured (benchmarks/server_load.py): a CPU forward pass is compute-bound, and
        # padding a batch to its longest prompt costs more than batching saves; accelerators gain from batches
        on_cpu = all(r.extractor.device.type == "cpu" for r in routers.values())
        max_batch = 1 if on_cpu else 32
    from difficulty_router.server.schema import Limits

    given = {
        "max_body_bytes": args.max_body_bytes,
        "max_messages": args.max_messages,
        "max_chars": args.max_chars,
        "max_n": args.max_n,
        "max_tokens": args.max_completion_tokens,
    }
    limits = Limits(**{k: v for k, v in given.items() if v is not None})
    if args.engine == "ray":  # the routers above were loaded once here to check them before the replicas start
        from difficulty_router.scale.commands import run_serve
        from difficulty_router.server.app import DEFAULT_ROUTER_NAME

        unsaved = {DEFAULT_ROUTER_NAME: routers[DEFAULT_ROUTER_NAME]} if args.pretrained is not None else {}
        dirs = _router_dirs(args.router or [])
        return run_serve(
            args,
            specs,
            dirs,
            api_key,
            limits,
            max_batch,
            holdback,
            unsaved_routers=unsaved,
            sessions={**session_options(args), "session_store": stores},
        )
    app = create_app(
        routers,
        specs,
        api_key=api_key,
        allow_unauthenticated=args.allow_unauthenticated,
        max_batch=max_batch,
        max_wait=args.max_wait_ms / 1000,
        max_queue=args.max_queue,
        route_timeout=args.route_timeout,
        limits=limits,
        stream_holdback=holdback,
        session_store=stores,
        **session_kwargs(args),
    )
    for name, router in routers.items():
        print(
            f"router {name!r}: {router.models} ({router.policy.kind} {router.policy.parameter}="
            f"{router.policy.value:.4g}), extractor {router.extractor.model_id} on {router.extractor.device}"
        )
    print(f"backends: {', '.join(f'{s.name} -> {s.base_url} ({s.model})' for s in specs)}")
    print(
        f"micro-batching: up to {max_batch} requests or {args.max_wait_ms:g} ms; at most {args.max_queue} waiting, "
        f"{args.route_timeout:g} s each"
    )
    print(
        f"limits: body {limits.max_body_bytes} bytes, {limits.max_messages} messages, {limits.max_chars} characters, "
        f"n <= {limits.max_n}, max_tokens <= {limits.max_tokens}"
    )
    print(f"streams: {holdback.describe()}")
    if stores is not None:
        print(f"sessions: {args.session_policy}, kept in Redis at {stores.address} (shared by every server using it)")
    print(f"serving http://{args.host}:{args.port}/v1 (auth {'on' if api_key else 'off'})", flush=True)
    serve(app, args.host, args.port, log_level="info" if args.verbose else "warning")
    return 0


def with_pretrained_router(args, routers: dict) -> dict:
    """Add the zero-label router, served as 'router': for the pool --pretrained names, else the served pool."""
    from difficulty_router.routing.router import DifficultyRouter
    from difficulty_router.server.app import DEFAULT_ROUTER_NAME

    if DEFAULT_ROUTER_NAME in routers:
        raise ValueError(
            f"--pretrained is served as {DEFAULT_ROUTER_NAME!r}; give the other router as --router NAME=DIR"
        )
    router = DifficultyRouter.pretrained(
        pool_from_spec(args.pretrained or args.pool), transfer_guard=transfer_guard_choice(args)
    )
    return {**routers, DEFAULT_ROUTER_NAME: router}


def add_session_arguments(p: argparse.ArgumentParser) -> None:
    """``serve`` options for sessions, shadow mode and the decision log."""
    p.add_argument(
        "--session-policy",
        choices=SESSION_POLICIES,
        default="per_call",
        help="how turns of one session (X-Session-Id header, else the 'user' field) are routed (default per_call)",
    )
    p.add_argument(
        "--session-store",
        metavar="URL",
        help="keep sessions in the Redis at URL (redis://[:password@]host:6379/0, rediss:// for TLS, unix://path), "
        "shared by every server and Ray Serve replica pointed at it (default: in this process; with --engine ray, "
        "one Ray actor); --max-sessions and --session-ttl apply",
    )
    p.add_argument("--session-ttl", type=float, default=3600.0, help="seconds a quiet session is kept (default 3600)")
    p.add_argument("--max-sessions", type=int, default=10_000, help="sessions kept, least recently used dropped first")
    p.add_argument(
        "--session-margin",
        type=float,
        default=0.05,
        help="sticky: the P(success) gain a more capable model needs before a session switches to it",
    )
    p.add_argument("--allow-deescalation", action="store_true", help="sticky: let a session move to a cheaper model")
    p.add_argument("--shadow", metavar="DEFAULT_MODEL", help="shadow mode: serve every request with this backend")
    p.add_argument(
        "--shadow-sample",
        type=float,
        default=0.0,
        help="shadow mode: share of requests also sent to the would-be model",
    )
    p.add_argument("--decision-log", metavar="PATH", help="append each routed request's decision here (JSON Lines)")
    p.add_argument("--decision-log-max-bytes", type=int, help="rotate the decision log at this size (default: never)")


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    """``serve`` options for when a stream commits to its backend (off by default: at the first chunk)."""
    p.add_argument(
        "--stream-holdback-chunks",
        type=int,
        default=0,
        metavar="K",
        help="hold a stream's first K chunks back from the client, so a backend that breaks before then "
        "escalates unseen to the next model (default 0: commit at the first chunk)",
    )
    p.add_argument(
        "--stream-holdback-ms",
        type=float,
        default=0.0,
        metavar="T",
        help="hold a stream back for its first T milliseconds (with --stream-holdback-chunks: whichever "
        "comes first; default 0: off)",
    )


def session_store_choice(args: argparse.Namespace) -> Any:
    """The shared session stores ``--session-store`` names (None: the default store), checked and reached now, so
    that a bad URL or an unreachable server is reported before any router loads or replica starts."""
    if not getattr(args, "session_store", None):
        return None
    if args.session_policy == "per_call":
        raise ValueError(
            "--session-store: --session-policy per_call keeps no sessions; give --session-policy sticky or "
            "cache_aware, or leave --session-store out"
        )
    from difficulty_router.routing.redis_sessions import RedisSessionStores

    stores = RedisSessionStores(args.session_store, max_sessions=args.max_sessions, ttl_s=args.session_ttl)
    stores.ping()
    return stores


def stream_holdback(args: argparse.Namespace) -> Any:
    """The :class:`~difficulty_router.StreamHoldback` the stream options give (refuses negative values)."""
    from difficulty_router.calling.dispatch import StreamHoldback

    return StreamHoldback(chunks=args.stream_holdback_chunks, ms=args.stream_holdback_ms)


def session_options(args: argparse.Namespace) -> dict[str, Any]:
    """``create_app`` keyword arguments from the parsed session and shadow options: the same for one server and
    for every Ray Serve replica (the decision log is opened by whichever runs, :func:`session_kwargs`)."""
    return {
        "session_policy": args.session_policy,
        "session_ttl": args.session_ttl,
        "max_sessions": args.max_sessions,
        "session_margin": args.session_margin,
        "allow_deescalation": args.allow_deescalation,
        "shadow": args.shadow,
        "shadow_sample": args.shadow_sample,
    }


def session_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``create_app`` keyword arguments from the parsed session, shadow and decision-log options."""
    from difficulty_router.routing.decision_log import DecisionLog

    log = None
    if args.decision_log:
        log = DecisionLog(args.decision_log, max_bytes=args.decision_log_max_bytes)
    return {**session_options(args), "decision_log": log}


def register(sub) -> None:
    p = sub.add_parser("route", help="print the routing decision for a query")
    p.add_argument("--router", help="saved router directory (or --pretrained)")
    pretrained_arg(p, flag_only=False)
    p.add_argument("query", help="the query text (or a JSON list of messages with --messages)")
    p.add_argument("--messages", action="store_true", help="QUERY is a JSON chat conversation")
    p.add_argument("--json", action="store_true")
    extractor_args(p)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible chat completions endpoint that routes")
    p.add_argument(
        "--router",
        action="append",
        help="saved router directory, served as model 'router'; or NAME=DIR (repeatable)",
    )
    pretrained_arg(p, flag_only=True)
    p.add_argument(
        "--pool", required=True, help="pool file whose models carry base_url (and model, api_key_env, timeout)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", help="require 'Authorization: Bearer $VAR' from clients (VAR names the variable)")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow a non-loopback --host without --api-key-env (only behind an authenticating proxy)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        help="most requests decided in one forward pass (default: 32 on a GPU/MPS extractor, 1 on CPU)",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a request waits for others to batch with")
    p.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="requests that may wait for routing; more are refused with 429 (default %(default)s)",
    )
    p.add_argument(
        "--route-timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait for its routing decision before a 503 (default %(default)s)",
    )
    p.add_argument("--max-body-bytes", type=int, help="largest request body, else 413 (default 4 MiB)")
    p.add_argument("--max-messages", type=int, help="most messages a request (default 1024)")
    p.add_argument("--max-chars", type=int, help="most characters of message text a request (default 1,000,000)")
    p.add_argument("--max-n", type=int, help="largest 'n' (default 16)")
    p.add_argument(
        "--max-completion-tokens", type=int, help="largest 'max_tokens' / 'max_completion_tokens' (default 131072)"
    )
    p.add_argument(
        "--ood-percentile",
        type=float,
        help="send queries whose read-out is more novel than this percentile of the training read-outs "
        "to the most capable model (default: off; the decision reports the percentile either way)",
    )
    add_session_arguments(p)
    add_stream_arguments(p)
    extractor_args(p)
    from difficulty_router.scale.commands import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
