"""``difficulty-router`` command line: extract, train, evaluate, route, serve, convert, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from difficulty_router.cli.feedback import add_update_args, cmd_train_update
from difficulty_router.cli.feedback import register as register_feedback
from difficulty_router.cli.label import register as register_label
from difficulty_router.cli.zero_label import load_router_or_pretrained, pretrained_arg
from difficulty_router.cli.zero_label import register as register_zero_label
from difficulty_router.extraction.model_store import DEFAULT_MODEL, cache_root
from difficulty_router.learning.families import FAMILIES


def _layers(values: list[str] | None):
    if values is None:
        return None
    out = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(float(part) if "." in part else int(part))
    return out


def _feature_cache(args):
    from difficulty_router.extraction.feature_cache import FeatureCache

    if getattr(args, "no_feature_cache", False):
        return None
    return FeatureCache(args.feature_cache or cache_root() / "features")


def _read_queries(path: Path) -> list:
    """One query per line: a JSON string, an object with prompt/messages/query, or (for .txt) raw text."""
    from difficulty_router.data.queries import query_from_json_line

    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    queries = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                queries.append(line.rstrip("\n"))
                continue
            queries.append(query_from_json_line(line, f"{path}, line {lineno}"))
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return queries


def cmd_extract(args) -> int:
    from difficulty_router.extraction.extractor import ActivationExtractor

    if args.engine == "ray":
        from difficulty_router.scale.commands import run_extract

        return run_extract(args, _layers(args.layers))
    queries = _read_queries(Path(args.input))
    start = time.perf_counter()
    extractor = ActivationExtractor(
        args.model,
        gguf_file=args.gguf_file,
        layers=_layers(args.layers) or 0.5,
        pooling=args.pooling,
        device=args.device,
        dtype=args.dtype,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    loaded = time.perf_counter()
    result = extractor.extract(queries, progress=args.progress)
    done = time.perf_counter()
    np.savez(
        args.output,
        features=result.features,
        layers=np.array(result.layers),
        pooling=np.array(result.pooling),
        n_tokens=result.n_tokens,
        truncated=result.truncated,
        model_id=np.array(result.model_id),
        model_hash=np.array(result.model_hash),
    )
    print(
        f"{len(queries)} queries -> features {result.shape} (layers {list(result.layers)}, pooling "
        f"{'+'.join(result.pooling)}) from {extractor.model_id} on "
        f"{extractor.device}/{str(extractor.dtype).split('.')[-1]}"
    )
    print(
        f"load {loaded - start:.1f} s, extract {done - loaded:.2f} s ({len(queries) / (done - loaded):.1f} queries/s); "
        f"{int(result.truncated.sum())} truncated to {args.max_tokens} tokens; wrote {args.output}"
    )
    return 0


def _load_data(path: str, limit: int | None = None, seed: int = 0):
    from difficulty_router.data.outcomes import load_outcomes

    outcomes = load_outcomes(path)
    if limit and limit < len(outcomes):
        keep = np.sort(np.random.default_rng(seed).choice(len(outcomes), limit, replace=False))
        outcomes = outcomes.subset(keep)
    return outcomes


def _print_training(router) -> None:
    info = router.info
    print(
        f"read-out: layer {list(router.layers)}, pooling {'+'.join(router.pooling)} "
        f"(of {router.extractor.n_layers} layers in {router.extractor.model_id})"
    )
    if info.get("readout_sweep"):
        best = sorted(info["readout_sweep"], key=lambda r: -np.nan_to_num(r["cv_auroc"], nan=-1))[:5]
        print(
            "read-out sweep (mean CV AUROC, top 5): "
            + ", ".join(f"L{r['layer']}/{r['pooling']} {r['cv_auroc']:.3f}" for r in best)
        )
    print("cross-validated AUROC of the activation probe per model:")
    for m, a in info["cv_auroc"].items():
        print(f"  {m}: {a:.3f}" if a == a else f"  {m}: - (always right or always wrong in training)")
    if info.get("families"):
        metric = "APGR" if len(router.models) == 2 else "frontier AUC"
        print(
            f"feature families by cross-validated routing quality ({metric} on out-of-fold predictions): "
            + ", ".join(
                f"{r['family']} {r['cv_routing_quality']:.3f}"
                if r["cv_routing_quality"] is not None
                else f"{r['family']} skipped ({r['skipped']})"
                for r in info["families"]
            )
            + f" -> {router.family}"
        )
    for m, reason in router.dropped.items():
        print(f"not routed to {m}: {reason}")
    if router.utility_margin:
        print(
            f"utility margin {router.utility_margin:g}: another model must beat the most capable one by this much "
            "(measured on out-of-fold predictions)"
        )
    point = info["default_operating_point"]
    print(
        f"default operating point ({router.policy.kind} {router.policy.parameter}={router.policy.value:.4g}): "
        f"out-of-fold accuracy {point['accuracy']:.3f} at mean cost {point['cost']:.4g}"
    )


def cmd_train(args) -> int:
    from difficulty_router.core.pool import ModelPool
    from difficulty_router.extraction.extractor import ActivationExtractor
    from difficulty_router.training.train import train_router
    from difficulty_router.training.update import record_training_source

    if args.update:  # refit a saved router with new labels (cli_feedback.py)
        return cmd_train_update(args, _feature_cache(args))
    if not args.pool:
        raise ValueError("train needs --pool (or --update OLD_ROUTER_DIR, which brings its pool)")
    pool = ModelPool.load(args.pool)
    outcomes = _load_data(args.data, args.limit, args.seed)
    pool.check_against(outcomes.models, args.data)
    extractor = ActivationExtractor(
        args.extractor, max_tokens=args.max_tokens, device=args.device, feature_cache=_feature_cache(args)
    )
    common = {
        "policy": args.policy,
        "cv": args.cv,
        "seed": args.seed,
        "progress": args.progress is not False,
        "families": args.families,
        "keep_models": args.keep_models or (),
    }
    where = ""
    if args.features:  # read-outs from Parquet shards (extract --engine ray) instead of the extractor
        from difficulty_router.scale.commands import train_from_shard_args

        router, where = train_from_shard_args(args, outcomes, pool, extractor, common)
    else:
        router = train_router(outcomes, pool, extractor, layers=_layers(args.layers), pooling=args.pooling, **common)
    router.info["training"]["data"] = str(args.data)
    record_training_source(router, args.data, args.limit, args.seed)  # what train --update reads back
    router.save(args.out)
    _print_training(router)
    print(f"{where}saved router to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from difficulty_router.evaluation.evaluate import evaluate_router, plot_report, report_table
    from difficulty_router.routing.router import DifficultyRouter

    router = DifficultyRouter.load(args.router, feature_cache=_feature_cache(args), **_extractor_choice(args))
    outcomes = _load_data(args.data, args.limit, args.seed)
    train = _load_data(args.train_data) if args.train_data else None
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


def cmd_route(args) -> int:
    router = load_router_or_pretrained(args, args.router)
    query = args.query
    if args.messages:
        query = json.loads(args.query)
    decision = router.route(query)
    print(json.dumps(decision.to_dict(), indent=1) if args.json else str(decision))
    return 0


def _extractor_choice(args) -> dict:
    """What ``DifficultyRouter.load`` may load as the extractor: the manifest's choice is trusted only for
    the embedded models; a hub id or path must be named with --extractor."""
    return {"model": args.extractor, "allow_other_extractor": args.allow_other_extractor}


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
        from difficulty_router.cli.serve_options import session_kwargs
        from difficulty_router.server import create_app, specs_from_pool
        from difficulty_router.server.run import check_exposure, serve
    except ImportError as exc:
        raise ValueError(
            f"the server needs its extra ({exc.name} is missing): pip install 'difficulty-router[server]'"
        ) from None

    if args.engine == "ray":
        from difficulty_router.scale.commands import refuse_unsupported_serve_options

        refuse_unsupported_serve_options(args)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    check_exposure(args.host, api_key, args.allow_unauthenticated)
    specs = specs_from_pool(ModelPool.load(args.pool))  # refuses a pool without base_urls before loading anything
    routers = {
        name: DifficultyRouter.load(d, **_extractor_choice(args)) for name, d in _router_dirs(args.router or []).items()
    }
    if args.pretrained is not None:  # the zero-label router for the served pool (or the pool --pretrained names)
        routers = _pretrained_routers(args, routers)
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

        return run_serve(args, specs, _router_dirs(args.router), api_key, limits, max_batch)
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
    print(f"serving http://{args.host}:{args.port}/v1 (auth {'on' if api_key else 'off'})", flush=True)
    serve(app, args.host, args.port, log_level="info" if args.verbose else "warning")
    return 0


def _pretrained_routers(args, routers: dict) -> dict:
    """Add the zero-label router, served as 'router': for the pool --pretrained names, else the served pool."""
    from difficulty_router.cli.zero_label import pool_from_spec
    from difficulty_router.routing.router import DifficultyRouter
    from difficulty_router.server.app import DEFAULT_ROUTER_NAME

    if DEFAULT_ROUTER_NAME in routers:
        raise ValueError(
            f"--pretrained is served as {DEFAULT_ROUTER_NAME!r}; give the other router as --router NAME=DIR"
        )
    return {**routers, DEFAULT_ROUTER_NAME: DifficultyRouter.pretrained(pool_from_spec(args.pretrained or args.pool))}


def cmd_convert(args) -> int:
    from difficulty_router.data.outcomes import load_llmrouter, load_mmlu_pro, save_outcomes

    if args.kind == "mmlu-pro":
        outcomes = load_mmlu_pro(args.source, models=args.models)
    else:
        outcomes = load_llmrouter(args.source)
        if args.models:
            outcomes = outcomes.select_models(args.models)
    save_outcomes(outcomes, args.output)
    print(f"wrote {len(outcomes)} rows x {len(outcomes.models)} models to {args.output}")
    return 0


def cmd_demo(args) -> int:
    """The main job: train on the shipped RouteLLM MMLU sample, evaluate held-out, route examples."""
    from difficulty_router.core.pool import ModelPool
    from difficulty_router.data.outcomes import load_outcomes
    from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE
    from difficulty_router.evaluation.evaluate import evaluate_router, plot_report, report_table
    from difficulty_router.extraction.extractor import ActivationExtractor
    from difficulty_router.training.train import train_router

    start = time.perf_counter()
    outcomes = load_outcomes(ROUTELLM_MMLU_SAMPLE)
    pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    n_train, n_test = args.train_rows, args.test_rows
    if n_train + n_test > len(outcomes):
        raise ValueError(f"--train-rows + --test-rows must be <= {len(outcomes)}")
    order = np.random.default_rng(args.seed).permutation(len(outcomes))
    train, test = outcomes.subset(np.sort(order[:n_train])), outcomes.subset(np.sort(order[n_train : n_train + n_test]))
    print(
        f"data: {ROUTELLM_MMLU_SAMPLE.name} (RouteLLM MMLU, Apache-2.0), {n_train} training rows, "
        f"{n_test} held-out rows, seed {args.seed}"
    )
    extractor = ActivationExtractor(DEFAULT_MODEL, max_tokens=args.max_tokens, feature_cache=_feature_cache(args))
    print(
        f"extractor: {extractor.model_id} ({extractor.n_layers} layers, hidden {extractor.hidden_size}) "
        f"on {extractor.device}, loaded in {time.perf_counter() - start:.1f} s"
    )
    router = train_router(
        train,
        pool,
        extractor,
        layers=_layers(args.layers),
        policy=args.policy,
        seed=args.seed,
        progress=args.progress is not False,
    )
    _print_training(router)
    out = Path(args.out)
    router.save(out)
    report = evaluate_router(router, test, train=train, seed=args.seed, progress=args.progress is not False)
    plot = plot_report(report, out / "evaluation.png", title="RouteLLM MMLU sample: GPT-4 vs Mixtral, held-out")
    (out / "evaluation.json").write_text(json.dumps(report, indent=1))
    print("\nheld-out evaluation (same rows for every predictor):")
    print(report_table(report))
    print(f"\nrouter saved to {out}/, plot {plot}")
    print("\nexample decisions:")
    examples: list[str | list[dict[str, str]]] = [
        "What is the capital of France?\nA. Paris\nB. Rome\nC. Berlin\nD. Madrid\nAnswer:",
        "Let p = (1, 2, 5, 4)(2, 3) in S_5. Find the index of <p> in S_5.\nA. 8\nB. 2\nC. 24\nD. 120\nAnswer:",
        [
            {"role": "system", "content": "You are a careful tax lawyer."},
            {
                "role": "user",
                "content": "Under IRC section 1031, which of the following exchanges qualifies?\n"
                "A. Stock for stock\nB. Land for a building\nC. Inventory for land\nD. None\nAnswer:",
            },
        ],
    ]
    for query, decision in zip(examples, router.route_batch(examples), strict=False):
        text = query if isinstance(query, str) else query[-1]["content"]
        print(f"  {text.splitlines()[0][:70]!r}\n    {decision}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difficulty-router", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def progress_arg(p):
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress bars on stderr (default: on for long work)",
        )

    def extractor_args(p):
        p.add_argument(
            "--extractor",
            help="load this extractor (short name, path or hub id); needed when the router "
            "was saved with a hub id or path, which a router file alone cannot allow",
        )
        p.add_argument(
            "--allow-other-extractor",
            action="store_true",
            help="allow --extractor to differ from the one the router was saved with (its weights "
            "must still hash the same)",
        )

    def cache_args(p):
        p.add_argument("--feature-cache", help=f"feature cache directory (default {cache_root() / 'features'})")
        p.add_argument("--no-feature-cache", action="store_true", help="do not read or write cached features")

    p = sub.add_parser("extract", help="extract activation features for queries")
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, model directory, .gguf file or hub id")
    p.add_argument("--gguf-file", help="GGUF file name inside --model when it is a directory")
    p.add_argument("--layers", nargs="+", help="hidden-state indexes or depth fractions, e.g. 15 -1 0.5")
    p.add_argument("--pooling", default="last", choices=["last", "mean", "both"])
    p.add_argument(
        "--input", required=True, help="JSON Lines of queries (strings or objects with prompt/messages), or .txt"
    )
    p.add_argument("--output", required=True, help="output .npz (with --engine ray: a directory of Parquet shards)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    progress_arg(p)
    from difficulty_router.scale.commands import add_extract_args

    add_extract_args(p)
    p.set_defaults(func=cmd_extract)

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
    from difficulty_router.cli.serve_options import add_session_arguments

    add_session_arguments(p)
    extractor_args(p)
    from difficulty_router.scale.commands import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="convert public routing data to an outcomes file")
    p.add_argument("kind", choices=["mmlu-pro", "llmrouter"])
    p.add_argument("source", help="MMLU-Pro directory, or an LLMRouter split file")
    p.add_argument("output", help="outcomes .jsonl or .jsonl.gz")
    p.add_argument("--models", nargs="+", help="keep only these models")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="train and evaluate on the shipped sample with the embedded extractor")
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--test-rows", type=int, default=500)
    p.add_argument(
        "--layers",
        nargs="+",
        default=["0.4"],
        help="candidate read-out layers (default 0.4: the forward pass stops at 40%% depth, which keeps "
        "the demo within about 3 minutes on 2 cores)",
    )
    p.add_argument("--max-tokens", type=int, default=512, help="prompts keep their last this-many tokens")
    p.add_argument("--policy", default="utility", choices=["utility", "threshold"])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    cache_args(p)
    progress_arg(p)
    p.set_defaults(func=cmd_demo)
    register_zero_label(sub, extractor_args, progress_arg)
    register_label(sub, extractor_args, progress_arg)
    register_feedback(sub)
    from difficulty_router.evaluation.report import add_report_parser

    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"difficulty-router {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
