"""``difficulty-router demo``: the whole job on the shipped RouteLLM MMLU sample with the embedded extractor:
train, evaluate on held-out rows against baselines, save, and route a few examples. A module of its own so
the demo's defaults (training size, read-out depth, token limit) sit in one place, beside the one command
that uses them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from difficulty_router.cli.common import cache_args, feature_cache_from_args, parse_layers, print_training, progress_arg
from difficulty_router.extraction.model_store import DEFAULT_MODEL


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
    extractor = ActivationExtractor(
        DEFAULT_MODEL, max_tokens=args.max_tokens, feature_cache=feature_cache_from_args(args)
    )
    print(
        f"extractor: {extractor.model_id} ({extractor.n_layers} layers, hidden {extractor.hidden_size}) "
        f"on {extractor.device}, loaded in {time.perf_counter() - start:.1f} s"
    )
    router = train_router(
        train,
        pool,
        extractor,
        layers=parse_layers(args.layers),
        policy=args.policy,
        seed=args.seed,
        progress=args.progress is not False,
    )
    print_training(router)
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


def register(sub) -> None:
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
