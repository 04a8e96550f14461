"""``difficulty-router feedback`` (grades joined to a decision log) and ``train --update`` (refit with new labels).
Registered by :mod:`.cli`; the work is in :mod:`.feedback` and :mod:`.update`."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_feedback(args) -> int:
    from difficulty_router.training.feedback import feedback_to_file

    report = feedback_to_file(
        args.log,
        args.grades,
        args.out,
        prompts=args.prompts,
        score_threshold=args.score_threshold,
        allow_unmatched=args.allow_unmatched,
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.summary())
        print(f"wrote {report.rows} training rows to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("feedback", help="join user grades or thumbs to a decision log: training rows from traffic")
    p.add_argument("log", help="decision log (JSON Lines; rotated LOG.1, LOG.2 ... are read too)")
    p.add_argument(
        "--grades",
        required=True,
        help="JSON Lines: query_id or prompt_sha256 (or the prompt), and thumbs, correct or score",
    )
    p.add_argument("--out", required=True, help="training JSON Lines to write (graded models only)")
    p.add_argument(
        "--prompts", help="JSON Lines holding the prompts' text (the log keeps only hashes), matched by SHA-256"
    )
    p.add_argument("--score-threshold", type=float, default=4.0, help="a score counts as correct at >= this (4)")
    p.add_argument("--allow-unmatched", action="store_true", help="count grades with no logged call instead of failing")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_feedback)


def add_update_args(p) -> None:
    """``train --update OLD --data NEW``: the pool, read-out, policy kind and families come from OLD."""
    p.add_argument(
        "--update",
        metavar="OLD_ROUTER_DIR",
        help="refit OLD_ROUTER_DIR on its own training labels plus --data (its read-out, policy and pool kept)",
    )
    p.add_argument(
        "--old-data",
        nargs="+",
        metavar="FILE",
        help="with --update: the labels OLD was trained on, when its manifest does not record them",
    )


def cmd_train_update(args, feature_cache) -> int:
    from difficulty_router.routing.router import DifficultyRouter
    from difficulty_router.training.update import describe_update, update_router

    given = [f for f, v in (("--pool", args.pool), ("--limit", args.limit), ("--layers", args.layers)) if v]
    if args.pooling or args.features:
        given.append("--pooling/--features")
    if given:
        raise ValueError(f"train --update takes the pool, read-out and rows from the old router; drop {given}")
    if Path(args.out).resolve() == Path(args.update).resolve():
        raise ValueError("train --update writes a new router: give an --out other than the old router's directory")
    old = DifficultyRouter.load(args.update, feature_cache=feature_cache)
    router = update_router(old, args.data, old_data=args.old_data, cv=args.cv, progress=args.progress is not False)
    router.save(args.out)
    print(describe_update(router))
    print(f"saved router to {args.out}")
    return 0
