"""Many-model pools: the MMLU-Pro seven-model ladder, a five-model MMLU-Pro pool spanning a 27x price range
and the LLMRouter pool, with 95% intervals over splits.

MMLU-Pro: prices are assumed public list prices in USD per million input/output tokens
(serverless Together AI for the open models, Google AI Studio <=128k context for Gemini,
late 2024); every model is charged the prompt (4 characters a token) plus 300 output
tokens of chain-of-thought. Each split holds out half of a seeded ``--limit``-row subset.
The five-model pool (``mmlu-pro-5``) adds DeepSeek-Coder-V2 (DeepSeek API) and jamba-1.5-large
(AI21, the dearest and weaker than three cheaper models: a dominated model) to the ladder's
gemini-1.5-flash, Llama-3.1-70B-Instruct and gemini-1.5-pro; it uses the ladder's seeded rows
(those where all five models have a record), so one extraction serves both.

LLMRouter: its own pool and prices (``models.json``, USD per million tokens), the prompt
plus 200 output tokens; scores are its 0..1 per-model scores. It trains on a seeded
``--limit``-row subset of its train file and tests on its whole test file (500 rows). With
``--splits 1`` that is its own single split, with intervals from a bootstrap of the test
rows; with more splits each trains on a different 80% of the subset.

Every predictor goes through the same utility policy sweep on the same rows, drops the
same dominated models (found on the training rows, less those the router's out-of-fold predictions
keep as complementary), and fits its margin the same way on
its own out-of-fold predictions. Reported: the cost at which each reaches the best single
model's accuracy (share of that model's cost), the share of the best-to-oracle gap closed,
the frontier AUC, and how often P(stronger) < P(weaker) for pairs of models.

    python benchmarks/routing_pools.py mmlu-pro --limit 3000 --splits 5
    python benchmarks/routing_pools.py mmlu-pro-5 --limit 3000 --splits 5
    python benchmarks/routing_pools.py llmrouter --limit 2000 --splits 5

These are the settings of the committed results (results/pool_<data>_<extractor>.*). Any other setting,
``--splits 5`` included, writes the same file name: give such runs another checkout or copy the results
away first.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from _common import extract_cached, machine, md_table, need_data, write_results
from routing_routellm import interval
from tqdm.auto import tqdm

from difficulty_router import ModelPool, PoolModel, load_llmrouter, load_mmlu_pro, train_router
from difficulty_router.core.metrics import pool_summary
from difficulty_router.data.queries import conversation_text
from difficulty_router.evaluation.baselines import baseline_proba
from difficulty_router.learning.policies import Policy, fit_margin, sweep
from difficulty_router.routing.calibration import realised_costs

MMLU_PRO_LADDER = {  # name in MMLU-Pro's eval_results: (input, output) USD per 1M tokens
    "Mistral-7B-Instruct-v0.2": (0.20, 0.20),
    "Meta-Llama-3_1-8B-Instruct": (0.18, 0.18),
    "Mixtral-8x7B-Instruct-v0.1": (0.60, 0.60),
    "Qwen1.5-72B-Chat": (0.90, 0.90),
    "Meta-Llama-3_1-70B-Instruct": (0.88, 0.88),
    "gemini-1.5-flash-002": (0.075, 0.30),
    "gemini-1.5-pro-002": (1.25, 5.00),
}
MMLU_PRO_FIVE = {
    "gemini-1.5-flash-002": (0.075, 0.30),
    "DeepSeek-Coder-V2": (0.14, 0.28),
    "Meta-Llama-3_1-70B-Instruct": (0.88, 0.88),
    "gemini-1.5-pro-002": (1.25, 5.00),
    "jamba-1.5-large": (2.00, 8.00),
}
PREDICTORS = ("router", "activation probe only", "shared model", "tfidf (tuned)", "knn (tuned)", "length", "random")
METRICS = ("cost_to_match_best", "oracle_gap_closed", "auc", "inversions")


def load(kind: str, limit: int, seed: int):
    """(all outcomes, pool, fixed test indexes or None)."""
    if kind in ("mmlu-pro", "mmlu-pro-5"):
        outcomes = load_mmlu_pro(need_data("mmlu_pro"), models=list(MMLU_PRO_LADDER))
        if limit and limit < len(outcomes):
            outcomes = outcomes.subset(np.sort(np.random.default_rng(seed).choice(len(outcomes), limit, replace=False)))
        prices = MMLU_PRO_LADDER
        if kind == "mmlu-pro-5":  # the ladder's rows where all five have a record
            prices = MMLU_PRO_FIVE
            five = load_mmlu_pro(need_data("mmlu_pro"), models=list(MMLU_PRO_FIVE))
            where = {q: i for i, q in enumerate(five.ids)}
            outcomes = five.subset([where[q] for q in outcomes.ids if q in where])
        pool = ModelPool(tuple(PoolModel(name=m, input_cost_per_1m=i, output_cost_per_1m=o, expected_output_tokens=300)
                               for m, (i, o) in prices.items()))
        return outcomes, pool, None
    prices = json.loads(need_data("llmrouter/models.json").read_text())
    train = load_llmrouter(need_data("llmrouter/train.jsonl.gz"))
    test = load_llmrouter(need_data("llmrouter/test.jsonl.gz"))
    names = [m for m in prices if m in train.models and m in test.models]
    train, test = train.select_models(names), test.select_models(names)
    if limit and limit < len(train):
        train = train.subset(np.sort(np.random.default_rng(seed).choice(len(train), limit, replace=False)))
    pool = ModelPool(tuple(PoolModel(name=m, input_cost_per_1m=prices[m]["input_price"],
                                     output_cost_per_1m=prices[m]["output_price"], expected_output_tokens=200)
                           for m in names))
    from difficulty_router.data.outcomes import Outcomes

    both = Outcomes(queries=train.queries + test.queries, models=names, scores=np.vstack([train.scores, test.scores]),
                    ids=train.ids + test.ids)
    return both, pool, np.arange(len(train), len(both))


def inversions(proba: np.ndarray, capability: np.ndarray) -> float:
    """Share of (row, pair of models) where the model more accurate in training gets the lower P(success),
    among pairs whose training accuracies differ by at least 5 points."""
    order = np.argsort(capability)
    count = total = 0
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            weak, strong = order[a], order[b]
            if capability[strong] - capability[weak] >= 0.05:
                count += int((proba[:, strong] < proba[:, weak]).sum())
                total += len(proba)
    return count / total if total else float("nan")


def score(proba, margin, test, costs_test, capability, eligible_test) -> dict:
    """Headline numbers of one predictor's utility curve on the test rows."""
    realised = realised_costs(test, costs_test)
    points = sweep(Policy("utility", margin=margin), proba, costs_test, capability, test.scores, realised, eligible_test)
    out = pool_summary(points, test.scores, realised.mean(axis=0), test.models)
    out["inversions"] = inversions(proba, capability)
    out["margin"] = margin
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", choices=["mmlu-pro", "mmlu-pro-5", "llmrouter"])
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples of the test rows when --splits is 1")
    parser.add_argument("--layers", nargs="+", type=float, default=[0.4, 0.5])
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    outcomes, pool, fixed_test = load(args.data, args.limit, args.seed)
    extractor, features, extract_s = extract_cached(args.extractor, args.max_tokens, outcomes.queries, args.layers,
                                                    args.progress)
    layers = list(features.layers)

    results = {p: {m: [] for m in METRICS} for p in PREDICTORS}
    boot = {p: {m: [] for m in METRICS} for p in PREDICTORS}
    chosen, dropped_sets, kept_sets, singles = [], [], [], []
    for s in tqdm(range(args.splits), desc="splits", disable=not args.progress):
        rng = np.random.default_rng(args.seed + 1 + s)
        if fixed_test is None:
            order = rng.permutation(len(outcomes))
            train_idx, test_idx = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
        else:  # LLMRouter: its own test file; with several splits each trains on 80% of the training rows
            pool_rows = np.arange(fixed_test[0])
            share = 1.0 if args.splits == 1 else 0.8
            train_idx, test_idx = np.sort(rng.choice(pool_rows, int(share * len(pool_rows)), replace=False)), fixed_test
        train, test = outcomes.subset(train_idx), outcomes.subset(test_idx)
        router = train_router(train, pool, extractor, layers=layers, seed=args.seed, progress=False)
        chosen.append(f"{router.family}, L{'+'.join(map(str, router.layers))} {'+'.join(router.pooling)}, "
                      f"margin {router.utility_margin:g}")
        dropped_sets.append(sorted(router.dropped))
        kept_sets.append(sorted(router.info["complementary_models"]))
        X = features.select(layers=router.layers, pooling=router.pooling).features
        capability = router.capability
        costs_train, costs_test = router.estimated_costs(train), router.estimated_costs(test)
        eligible_train, eligible_test = router.eligibility(len(train), None), router.eligibility(len(test), None)
        fit = router.family_fit_
        test_texts = [conversation_text(c) for c in test.queries]
        predictions = {
            "router": (router.proba_from(test.queries, X[test_idx]), fit.oof[router.family]),
            "activation probe only": (router.probe.predict_proba(X[test_idx]), fit.oof["activation"]),
            "shared model": (fit.shared.predict_proba(X[test_idx]), fit.oof["shared"]),
            # the router's own lexical probe is the tuned TF-IDF baseline (same CV over analyzer, n-grams and C)
            "tfidf (tuned)": (fit.lexical.predict_proba(test_texts), fit.oof["lexical"]),
        }
        for name, kind in (("knn (tuned)", "knn"), ("length", "length")):
            feats = dict(train_features=X[train_idx], test_features=X[test_idx]) if kind == "knn" else {}
            oof_feats = dict(test_features=X[train_idx]) if kind == "knn" else {}
            predictions[name] = (baseline_proba(kind, test, train=train, seed=args.seed, **feats),
                                 baseline_proba(kind, train, seed=args.seed, **oof_feats))
        predictions["random"] = (baseline_proba("random", test, seed=args.seed + s), None)
        margins = {name: fit_margin(oof, train.scores, costs_train, capability, eligible_train)[0] if oof is not None
                   else 0.0 for name, (proba, oof) in predictions.items()}
        for name, (proba, _) in predictions.items():
            rep = score(proba, margins[name], test, costs_test, capability, eligible_test)
            for m in METRICS:
                value = rep[m]
                results[name][m].append(np.nan if value is None else value)
        if args.splits == 1:  # one split: 95% intervals from a bootstrap of the test rows, the same resamples for all
            boot_rng = np.random.default_rng(args.seed)
            for _ in tqdm(range(args.bootstrap), desc="bootstrap", disable=not args.progress):
                rows = boot_rng.integers(0, len(test), len(test))
                for name, (proba, _) in predictions.items():
                    rep = score(proba[rows], margins[name], test.subset(rows), costs_test[rows], capability,
                                eligible_test[rows])
                    for m in METRICS:
                        boot[name][m].append(np.nan if rep[m] is None else rep[m])
        realised = realised_costs(test, costs_test)
        singles.append({m: (float(test.scores[:, j].mean()), float(realised[:, j].mean())) for j, m in enumerate(test.models)})
        print(f"split {s}: router {chosen[-1]}, cost to match best {results['router']['cost_to_match_best'][-1]}, "
              f"gap closed {results['router']['oracle_gap_closed'][-1]:.3f}; tfidf "
              f"{results['tfidf (tuned)']['cost_to_match_best'][-1]}", flush=True)

    def cell(p, m, percent=False):
        values = np.asarray(results[p][m], dtype=np.float64)
        reached = np.isfinite(values)
        if not reached.any():
            return "never"
        f = (lambda x: f"{100 * x:.1f}%") if percent else (lambda x: f"{x:.3f}")
        if args.splits == 1:
            draws = np.asarray(boot[p][m], dtype=np.float64)
            hit = np.isfinite(draws)
            lo, hi = np.percentile(draws[hit], [2.5, 97.5]) if hit.any() else (np.nan, np.nan)
            return f"{f(values[0])} [{f(lo)}, {f(hi)}]" + ("" if hit.all() else f" (reached in {hit.mean():.0%} of resamples)")
        mean, lo, hi = interval(values[reached]) if reached.sum() > 1 else (float(values[reached][0]),) * 3
        text = f"{f(mean)} [{f(lo)}, {f(hi)}]" if reached.sum() > 1 else f(mean)
        return text + ("" if reached.all() else f" ({reached.sum()}/{len(values)} splits reach it)")

    rows = [[p, cell(p, "cost_to_match_best", True), cell(p, "oracle_gap_closed"), cell(p, "auc"),
             cell(p, "inversions", True)] for p in PREDICTORS]
    models = list(singles[0])
    single_rows = [[m, f"{np.mean([s[m][0] for s in singles]):.3f}", f"${np.mean([s[m][1] for s in singles]):.6f}",
                    f"{sum(m in d for d in dropped_sets)}/{len(dropped_sets)}",
                    f"{sum(m in k for k in kept_sets)}/{len(kept_sets)}"] for m in models]
    title = {"mmlu-pro": "MMLU-Pro seven-model ladder", "mmlu-pro-5": "MMLU-Pro five-model pool (27x price range)",
             "llmrouter": "LLMRouter pool"}[args.data]
    md = (f"{title}: {len(outcomes)} rows, {args.splits} splits "
          + ("(half train / half test each)" if fixed_test is None else
             f"(train on {'all' if args.splits == 1 else '80% of'} {fixed_test[0]} training rows, test on the "
             f"{len(fixed_test)} rows of its test file)")
          + f"; extractor {extractor.model_id}, candidate layers {list(features.layers)}; extraction {extract_s:.0f} s "
          f"(0 when cached) on {machine()}.\n\n"
          + md_table(["model", "test accuracy (mean)", "mean cost per query", "dropped as dominated",
                      "dominated but kept (complementary)"], single_rows)
          + ("\n\nOne split: the value on the test rows with a 95% interval from "
             f"{args.bootstrap} bootstrap resamples of them (margins and models fixed)." if args.splits == 1 else
             "\n\nMean over splits with its 95% t-interval.")
          + " Cost to match the best: the cheapest point of the "
          "predictor's curve reaching the best single model's test accuracy, as a share of that model's cost. "
          "Inversions: how often a model at least 5 points more accurate in training gets the lower P(success).\n\n"
          + md_table(["predictor", "cost to match the best model", "best-to-oracle gap closed", "frontier AUC",
                      "inversions"], rows)
          + "\n\nWhat the router chose per split: " + "; ".join(chosen) + "\n")
    write_results(f"pool_{args.data}_{extractor.model_id}", md,
                  {"machine": machine(), "data": args.data, "n": len(outcomes), "splits": args.splits,
                   "results": results, "chosen": chosen, "dropped": dropped_sets, "complementary": kept_sets, "singles": singles})


if __name__ == "__main__":
    main()
