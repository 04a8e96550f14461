"""``difficulty-router train`` (a router from an outcomes file, or ``--update``: an old router refitted with new
labels) and ``evaluate`` (a saved router on labelled rows against baselines). Together because they are the
two ends of the labelled-data loop and share its options; the work is in :mod:`difficulty_router.training`
and :mod:`difficulty_router.evaluation`."""

from __future__ import annotations

import json
from pathlib import Path

from difficulty_router.cli.common import (
    cache_args,
    extractor_args,
    extractor_choice,
    feature_cache_from_args,
    load_outcome_rows,
    parse_layers,
    print_training,
    progress_arg,
)
from difficulty_router.extraction.model_store import DEFAULT_MODEL
from difficulty_router.learning.families import FAMILIES
from difficulty_router.learning.risk_control import DEFAULT_DELTA, DEFAULT_EPSILON


def cmd_train(args) -> int:
    from difficulty_router.core.pool import ModelPool
    from difficulty_router.extraction.extractor import ActivationExtractor
    from difficulty_router.training.train import train_router
    from difficulty_router.training.update import record_training_source

    if args.update:  # refit a saved router with new labels (cmd_train_update below)
        return cmd_train_update(args, feature_cache_from_args(args))
    if not args.pool:
        raise ValueError("train needs --pool (or --update OLD_ROUTER_DIR, which brings its pool)")
    pool = ModelPool.load(args.pool)
    outcomes = load_outcome_rows(args.data, args.limit, args.seed)
    pool.check_against(outcomes.models, args.data)
    extractor = ActivationExtractor(
        args.extractor, max_tokens=args.max_tokens, device=args.device, feature_cache=feature_cache_from_args(args)
    )
    common = {
        "policy": args.policy,
        "cv": args.cv,
        "seed": args.seed,
        "progress": args.progress is not False,
        "families": args.families,
        "keep_models": args.keep_models or (),
        "max_accuracy_drop": args.max_accuracy_drop,
    }
    risk = {"guarantee": args.guarantee, "delta": args.delta}
    where = ""
    if args.features:  # read-outs from Parquet shards (extract --engine ray) instead of the extractor
        from difficulty_router.scale.commands import train_from_shard_args

        # the streamed fit records the risk-controlled point at the default delta; it takes no options for it
        given = args.guarantee or args.delta != DEFAULT_DELTA
        router, where = train_from_shard_args(args, outcomes, pool, extractor, {**common, **risk} if given else common)
    else:
        router = train_router(
            outcomes, pool, extractor, layers=parse_layers(args.layers), pooling=args.pooling, **common, **risk
        )
    router.info["training"]["data"] = str(args.data)
    record_training_source(router, args.data, args.limit, args.seed)  # what train --update reads back
    router.save(args.out)
    print_training(router)
    print(f"{where}saved router to {args.out}")
    return 0


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


def cmd_evaluate(args) -> int:
    from difficulty_router.evaluation.evaluate import evaluate_router, plot_report, report_table
    from difficulty_router.routing.router import DifficultyRouter

    router = DifficultyRouter.load(args.router, feature_cache=feature_cache_from_args(args), **extractor_choice(args))
    outcomes = load_outcome_rows(args.data, args.limit, args.seed)
    train = load_outcome_rows(args.train_data) if args.train_data else None
    report = evaluate_router(router, outcomes, train=train, seed=args.seed, progress=not args.json)
    plot = Path(args.plot) if args.plot else Path(args.router) / "evaluation.png"
    plot_report(report, plot, title=f"{Path(args.data).name}: held-out cost-accuracy")
    report["plot"] = str(plot)
    (Path(args.router) / "evaluation.json").write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    else:
        print(report_table(report))
        print(f"plot: {plot}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a router from an outcomes file")
    p.add_argument("--data", required=True, help="outcomes JSON Lines (.gz ok)")
    p.add_argument("--pool", help="model pool file (JSON or YAML) with costs (required unless --update)")
    p.add_argument("--extractor", default=DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="directory to save the router")
    add_update_args(p)
    p.add_argument("--layers", nargs="+", help="candidate read-out layers (default: middle layers)")
    p.add_argument("--pooling", choices=["last", "mean", "both"], help="fix the pooling instead of sweeping it")
    p.add_argument("--policy", default="utility", choices=["utility", "threshold"])
    p.add_argument(
        "--families",
        nargs="+",
        choices=list(FAMILIES),
        default=list(FAMILIES),
        help="feature families to compare by cross-validation (default: all; the best is kept)",
    )
    p.add_argument(
        "--keep-models",
        nargs="+",
        metavar="MODEL",
        help="route to these models even if training finds them dominated on accuracy and cost",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=DEFAULT_EPSILON,
        help="accuracy points the default operating point may give up against the best single model "
        "(default 0.01 = 1 point)",
    )
    p.add_argument(
        "--delta",
        type=float,
        default=DEFAULT_DELTA,
        help="the risk-controlled point keeps the expected drop within --max-accuracy-drop with probability "
        "1 - delta on unseen queries (default 0.1)",
    )
    p.add_argument(
        "--guarantee",
        action="store_true",
        help="make the risk-controlled point the router's policy instead of the out-of-fold point estimate",
    )
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--limit", type=int, help="train on a seeded random subset of this many rows")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    cache_args(p)
    progress_arg(p)
    from difficulty_router.scale.commands import add_train_args

    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a router on labelled rows against baselines")
    p.add_argument("--router", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--train-data", help="fit the surface baselines here (default: cross-fitted on --data)")
    p.add_argument("--limit", type=int)
    p.add_argument("--plot", help="PNG path (default: ROUTER/evaluation.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)
    cache_args(p)
    extractor_args(p)
    p.set_defaults(func=cmd_evaluate)
