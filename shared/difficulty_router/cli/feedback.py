"""``difficulty-router feedback``: user grades or thumbs joined to a decision log, written as training rows that
``train --update`` (in :mod:`.train`) refits a router with. A module of its own because it reads traffic, not a
labelled data set; the work is in :mod:`difficulty_router.training.feedback`."""

from __future__ import annotations

import json


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
