"""MMLU-Pro, a seven-model ladder from 7B open models to Gemini 1.5 Pro, priced per token.

Prices are assumed public list prices in USD per million input/output tokens (serverless
Together AI for the open models, Google AI Studio <=128k context for Gemini, late 2024);
every model is charged the prompt (4 characters a token) plus 300 output tokens for a
chain-of-thought answer, so cost differences come from the prices. A seeded subset of
``--limit`` questions is split 50/50 into training and held-out rows.

    python benchmarks/routing_mmlu_pro.py --limit 3000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import RESULTS, machine, md_table, need_data, num, pct, write_results
from difficulty_router import (ActivationExtractor, FeatureCache, ModelPool, PoolModel, cache_root, load_mmlu_pro,
                               train_router)
from difficulty_router.evaluation import evaluate_proba, evaluate_router, plot_report

LADDER = {  # name in MMLU-Pro's eval_results: (input, output) USD per 1M tokens
    "Mistral-7B-Instruct-v0.2": (0.20, 0.20),
    "Meta-Llama-3_1-8B-Instruct": (0.18, 0.18),
    "Mixtral-8x7B-Instruct-v0.1": (0.60, 0.60),
    "Qwen1.5-72B-Chat": (0.90, 0.90),
    "Meta-Llama-3_1-70B-Instruct": (0.88, 0.88),
    "gemini-1.5-flash-002": (0.075, 0.30),
    "gemini-1.5-pro-002": (1.25, 5.00),
}
OUTPUT_TOKENS = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--layers", nargs="+", type=float, default=[0.4, 0.5])
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    outcomes = load_mmlu_pro(need_data("mmlu_pro"), models=list(LADDER))
    n_all = len(outcomes)
    if args.limit and args.limit < len(outcomes):
        outcomes = outcomes.subset(np.sort(np.random.default_rng(args.seed).choice(len(outcomes), args.limit, replace=False)))
    pool = ModelPool(tuple(PoolModel(name=m, input_cost_per_1m=i, output_cost_per_1m=o, expected_output_tokens=OUTPUT_TOKENS)
                           for m, (i, o) in LADDER.items()))
    layers = [int(x) if float(x).is_integer() else x for x in args.layers]
    extractor = ActivationExtractor(args.extractor, max_tokens=args.max_tokens,
                                    feature_cache=FeatureCache(cache_root() / "features"))
    start = time.perf_counter()
    features = extractor.extract(outcomes.queries, layers=layers, pooling="both", progress=True)
    extract_s = time.perf_counter() - start
    train, test = outcomes.split(0.5, seed=args.seed)
    train_idx = np.array([outcomes.ids.index(i) for i in train.ids])
    test_idx = np.array([outcomes.ids.index(i) for i in test.ids])
    router = train_router(train, pool, extractor, layers=layers, seed=args.seed, progress=True)
    proba = router.probe.predict_proba(features.select(layers=router.layers, pooling=router.pooling).features[test_idx])
    report = evaluate_router(router, test, train=train, seed=args.seed, proba=proba)
    threshold = evaluate_proba(proba, test, router.estimated_costs(test), router.capability, "threshold", args.seed)
    result_name = f"mmlu_pro_{extractor.model_id}"  # one name for the table, the JSON and the plot
    plot_report(report, RESULTS / f"{result_name}.png", title=f"MMLU-Pro 7-model ladder, {args.extractor}, {len(test)} held-out")

    singles = md_table(["model", "price in/out per 1M", "held-out accuracy", "mean cost per query",
                        "cross-validated AUROC of its probe"],
                       [[m, f"${LADDER[m][0]:g} / ${LADDER[m][1]:g}", f"{v['accuracy']:.3f}", f"${v['cost']:.6f}",
                         num(router.info["cv_auroc"][m])] for m, v in report["single_models"].items()])
    rows = []
    for name, rep in [("router, utility [default]", report), ("router, threshold", threshold)] + \
            [(f"baseline: {k}", v) for k, v in report["baselines"].items()]:
        rows.append([name, pct(rep["cost_to_match_best"]), num(rep["oracle_gap_closed"]), num(rep["best_accuracy"]),
                     num(rep["auc"])])
    md = (f"MMLU-Pro, {len(outcomes)} of {n_all} questions (seed {args.seed}), {len(train)} train / {len(test)} held-out; "
          f"extractor {extractor.model_id}, read-out layer {list(router.layers)} {'+'.join(router.pooling)}; "
          f"extraction {extract_s:.0f} s on {machine()}.\n\n" + singles + "\n\n"
          f"Best single model: {report['best_model']} ({report['best_model_accuracy']:.3f}); oracle "
          f"{report['oracle_accuracy']:.3f}.\n\n"
          + md_table(["predictor", "cost to match the best model", "best-to-oracle gap closed",
                      "best accuracy on the curve", "frontier auc"], rows))
    write_results(result_name, md, {
        "machine": machine(), "n": len(outcomes), "prices": LADDER, "output_tokens": OUTPUT_TOKENS,
        "readout": router.info["readout"], "cv_auroc": router.info["cv_auroc"],
        "single_models": report["single_models"],
        "utility": {k: report[k] for k in ("cost_to_match_best", "oracle_gap_closed", "best_accuracy", "auc")},
        "threshold": {k: threshold[k] for k in ("cost_to_match_best", "oracle_gap_closed", "best_accuracy", "auc")},
        "baselines": {k: {m: v[m] for m in ("cost_to_match_best", "oracle_gap_closed", "best_accuracy", "auc")}
                      for k, v in report["baselines"].items()},
    })


if __name__ == "__main__":
    main()
