"""``difficulty-router pretrained`` (write a zero-label router for a pool from the shipped difficulty head) and
``calibrate`` (set a saved router's operating point from unlabelled prompts). Together because both route
without labels; ``route`` and ``serve`` take the same zero-label router with ``--pretrained`` (its option and
loader are in :mod:`.common`). The work is in :mod:`difficulty_router.routing.pretrained`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difficulty_router.cli.common import (
    extractor_args,
    extractor_choice,
    pool_from_spec,
    progress_arg,
    read_queries,
    transfer_guard_arg,
    transfer_guard_choice,
)


def cmd_pretrained(args) -> int:
    from difficulty_router.routing.router import DifficultyRouter

    if not args.unlabelled and (args.strong_share is not None or args.max_cost_per_1k is not None):
        raise ValueError("--strong-share and --max-cost-per-1k need --unlabelled prompts; without them give --shares")
    router = DifficultyRouter.pretrained(
        pool_from_spec(args.pool), shares=args.shares, transfer_guard=transfer_guard_choice(args)
    )
    if args.unlabelled:
        _calibrate(router, args)
    router.save(args.out)
    shares = router.info["zero_label"]["shares"]
    print(f"saved a zero-label router for {router.models} (shares {[round(s, 3) for s in shares]}) to {args.out}")
    return 0


def _calibrate(router, args) -> dict:
    prompts = read_queries(Path(args.unlabelled))
    report = router.calibrate(
        unlabelled=prompts,
        strong_share=args.strong_share,
        shares=args.shares,
        max_cost_per_1k=args.max_cost_per_1k,
        progress=args.progress,
    )
    print(
        f"calibrated on {report['n']} prompts: {report['strong_model']} gets {100 * report['strong_share']:.1f}% "
        f"of calls; shares {json.dumps({m: round(s, 3) for m, s in report['shares'].items()})}; "
        f"estimated cost {report['cost_per_1k']:.6g} per 1,000 queries"
    )
    return report


def cmd_calibrate(args) -> int:
    from difficulty_router.routing.router import DifficultyRouter

    router = DifficultyRouter.load(args.router, **extractor_choice(args))
    _calibrate(router, args)
    out = args.out or args.router
    router.save(out)
    print(f"saved the calibrated router to {out}")
    return 0


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share must lie in [0, 1], got {value:g}")
    return value


def _target_args(p, with_shares: bool) -> None:
    target = p.add_mutually_exclusive_group(required=not with_shares)
    target.add_argument("--strong-share", type=_share, help="share of calls to the most capable model, in [0, 1]")
    target.add_argument("--max-cost-per-1k", type=float, help="budget: mean estimated cost per 1,000 queries")
    if with_shares:
        p.add_argument("--shares", type=_share, nargs="+", help="share of calls per model, cheapest first (sum 1)")


def register(sub) -> None:
    p = sub.add_parser("pretrained", help="write a zero-label router for a pool from the shipped difficulty head")
    p.add_argument("--pool", required=True, help="pool file (models cheapest first) or cheap,...,strong model names")
    p.add_argument("--out", required=True, help="directory to save the router")
    p.add_argument("--unlabelled", help="JSON Lines of your prompts: set the shares on them instead of on pretraining")
    _target_args(p, with_shares=True)
    transfer_guard_arg(p)
    progress_arg(p)
    p.set_defaults(func=cmd_pretrained)

    p = sub.add_parser("calibrate", help="set a saved router's operating point from unlabelled prompts (saves back)")
    p.add_argument("router", help="saved router directory")
    p.add_argument("--unlabelled", required=True, help="JSON Lines (or .txt) of your prompts, one a line")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--strong-share", type=_share, help="share of calls to the most capable model, in [0, 1]")
    target.add_argument("--max-cost-per-1k", type=float, help="budget: mean estimated cost per 1,000 queries")
    target.add_argument("--shares", type=_share, nargs="+", help="per model, cheapest first (zero-label routers)")
    p.add_argument("--out", help="save here instead of back to ROUTER")
    extractor_args(p)
    progress_arg(p)
    p.set_defaults(func=cmd_calibrate)
