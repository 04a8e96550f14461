"""``difficulty-router convert``: public routing data (MMLU-Pro results, LLMRouter splits) as an outcomes file
that ``train`` reads. A module of its own because it touches neither an extractor nor a router; the readers
are in :mod:`difficulty_router.data.outcomes`."""

from __future__ import annotations


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


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert public routing data to an outcomes file")
    p.add_argument("kind", choices=["mmlu-pro", "llmrouter"])
    p.add_argument("source", help="MMLU-Pro directory, or an LLMRouter split file")
    p.add_argument("output", help="outcomes .jsonl or .jsonl.gz")
    p.add_argument("--models", nargs="+", help="keep only these models")
    p.set_defaults(func=cmd_convert)
