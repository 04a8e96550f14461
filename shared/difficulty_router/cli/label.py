"""``difficulty-router label``: run a prompt file through every pool model, grade, write training JSONL.
A module of its own because it is the one command that calls the pool's models (and spends money); the work is
in :mod:`difficulty_router.data.labelling`."""

from __future__ import annotations

import argparse
from pathlib import Path

from difficulty_router.cli.common import extractor_args, load_router_or_pretrained, progress_arg


def cmd_label(args) -> int:
    from difficulty_router.data.labelling import (
        Labeller,
        config_from_pool_file,
        openai_backend,
        read_prompt_rows,
        select_uncertain,
    )

    pool, config = config_from_pool_file(
        args.pool,
        grader=args.grader,
        threshold=args.judge_threshold,
        concurrency=args.concurrency,
        retries=args.retries,
        max_usd=args.max_usd,
    )
    if args.max_tokens is not None or args.temperature is not None or args.system is not None:
        given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "system": args.system}
        for name in pool.names:  # command-line settings fill in what the pool file's label.generation leaves open
            config.generation[name] = {
                **{k: v for k, v in given.items() if v is not None},
                **config.generation.get(name, {}),
            }
    rows = read_prompt_rows(args.input)
    if args.select is not None:
        if args.router is None and args.pretrained is None:
            args.pretrained = args.pool  # the zero-label router for this pool
        router = load_router_or_pretrained(args, args.router)
        before = len(rows)
        rows = select_uncertain(router, rows, args.select, progress=args.progress)
        print(f"selected {len(rows)} of {before} prompts by the router's uncertainty")
    backends = [openai_backend(m) for m in pool.models]
    if args.engine == "ray":
        from difficulty_router.scale.commands import ray_labeller

        labeller = ray_labeller(args, backends, config)
    else:
        labeller = Labeller(backends, config)
    report = labeller.run(rows, Path(args.out), progress=args.progress is not False)
    print(report.table())
    if report.stopped:
        print(f"stopped early: {report.stopped}; re-run with a larger --max-usd to continue")
    print(
        f"{report.calls} calls in {report.seconds:.1f} s; wrote {report.rows_written} training rows to {report.output}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("label", help="collect correctness labels: every prompt through every pool model, graded")
    p.add_argument("input", help="JSON Lines of prompts: strings or objects with prompt/messages, id, reference")
    p.add_argument("--pool", required=True, help="pool file whose models carry base_url (optional 'label' section)")
    p.add_argument("--out", required=True, help="training JSON Lines to write (its journal: OUT.calls.jsonl)")
    p.add_argument("--grader", help="reference grader: exact, choice, number or regex (else the judge)")
    p.add_argument("--judge-threshold", type=int, help="judge score (1-5) counted as correct, default 4")
    p.add_argument("--concurrency", type=int, help="concurrent calls per model (default 4)")
    p.add_argument("--retries", type=int, help="retries of a transient error per call (default 3)")
    p.add_argument(
        "--max-usd", type=float, help="stop starting new calls once this much has been spent on OUT (all runs together)"
    )
    p.add_argument("--max-tokens", type=int, help="completion limit for every pool model")
    p.add_argument("--temperature", type=float)
    p.add_argument("--system", help="system prompt for every pool model")
    p.add_argument("--select", type=int, help="label only the N prompts the router is least sure about")
    p.add_argument("--router", help="router for --select (default: the zero-label router for --pool)")
    p.add_argument("--pretrained", help=argparse.SUPPRESS)
    from difficulty_router.scale.commands import add_label_args

    add_label_args(p)
    extractor_args(p)
    progress_arg(p)
    p.set_defaults(func=cmd_label)
