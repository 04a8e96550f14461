"""``serve`` options for sessions, shadow mode and the decision log (kept apart from cli.py's own; no server
imports here, so ``--help`` works without the server extra)."""

from __future__ import annotations

import argparse
from typing import Any

from difficulty_router.routing.sessions import SESSION_POLICIES


def add_session_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--session-policy",
        choices=SESSION_POLICIES,
        default="per_call",
        help="how turns of one session (X-Session-Id header, else the 'user' field) are routed (default per_call)",
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


def session_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``create_app`` keyword arguments from the parsed options."""
    from difficulty_router.routing.decision_log import DecisionLog

    log = None
    if args.decision_log:
        log = DecisionLog(args.decision_log, max_bytes=args.decision_log_max_bytes)
    return {
        "session_policy": args.session_policy,
        "session_ttl": args.session_ttl,
        "max_sessions": args.max_sessions,
        "session_margin": args.session_margin,
        "allow_deescalation": args.allow_deescalation,
        "shadow": args.shadow,
        "shadow_sample": args.shadow_sample,
        "decision_log": log,
    }
