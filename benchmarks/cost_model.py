"""The cost model on MMLU-Pro: output-length prediction, and expected-dollar vs constant-cost routing.

MMLU-Pro records answer lengths (``output_chars``, 4 characters a token) for four of its models
only: DeepSeek-Coder-V2, gemini-1.5-flash-002, gemini-1.5-pro-002 and jamba-1.5-large; the pool is
those four. Rows: the seeded 3,000-row subset ``routing_pools.py mmlu-pro`` reads (so the feature
cache serves it), kept where all four have a record. Each of ``--splits`` seeded splits trains the
router (activation probe, fixed read-out L12 mean: the one ``routing_pools.py`` chose on these rows)
and the length head on one half and tests on the other.

Prices (USD per 1M input / output tokens) are ASSUMED public list prices from the providers' pages
as of late 2024, not checked from this machine: gemini-1.5-flash-002 0.075 / 0.30 and
gemini-1.5-pro-002 1.25 / 5.00 (Google AI Studio, prompts <= 128k), DeepSeek-Coder-V2 0.14 / 0.28
(DeepSeek API), jamba-1.5-large 2.00 / 8.00 (AI21). A row's real cost on a model: its prompt
(4 characters a token) at the input price plus the model's recorded answer at the output price.

Output-length error: MAE of log tokens and the median relative error of the predicted tokens, the
head against each model's mean log length on the training half. Routing: the same success
probabilities go through the utility sweep with three cost estimates: a constant 300 output tokens
(what ``routing_pools.py`` assumes), each model's mean length, and the head's per-query prediction
(expected dollars); every point is charged its real cost. Means over splits with 95% t-intervals.

    python benchmarks/cost_model.py --limit 3000 --splits 5
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import extract_cached, machine, md_table, need_data, write_results
from routing_pools import MMLU_PRO_LADDER
from routing_routellm import interval
from tqdm.auto import tqdm

from difficulty_router import ModelPool, PoolModel, load_mmlu_pro, train_router
from difficulty_router.core.metrics import pool_summary
from difficulty_router.data.queries import conversation_text
from difficulty_router.learning.length_head import OutputLengthHead, output_tokens_from_chars
from difficulty_router.learning.policies import Policy, sweep

PRICES = {  # USD per 1M input / output tokens: assumed public list prices, late 2024 (see the docstring)
    "DeepSeek-Coder-V2": (0.14, 0.28),
    "gemini-1.5-flash-002": (0.075, 0.30),
    "gemini-1.5-pro-002": (1.25, 5.00),
    "jamba-1.5-large": (2.00, 8.00),
}
ESTIMATES = ("constant 300 tokens", "per-model mean length", "predicted length (expected dollars)")
TARGETS = (0.0, 0.01, 0.02)  # accuracy points below the best single model


def load_rows(limit: int, seed: int):
    """The 3,000-row subset of routing_pools.py (same seed), restricted to rows where the four have lengths."""
    ladder = load_mmlu_pro(need_data("mmlu_pro"), models=list(MMLU_PRO_LADDER))
    keep_ids = set(ladder.ids)
    if limit and limit < len(ladder):
        picked = np.sort(np.random.default_rng(seed).choice(len(ladder), limit, replace=False))
        keep_ids = {ladder.ids[i] for i in picked}
    outcomes = load_mmlu_pro(need_data("mmlu_pro"), models=list(PRICES))
    tokens = output_tokens_from_chars(outcomes.extra["output_chars"])
    rows = [i for i, q in enumerate(outcomes.ids) if q in keep_ids and np.isfinite(tokens[i]).all()]
    outcomes = outcomes.subset(rows)
    return outcomes, tokens[rows]


def cost_matrix(prompt_tokens: np.ndarray, output_tokens: np.ndarray, models: list[str]) -> np.ndarray:
    price_in = np.array([PRICES[m][0] for m in models]) / 1e6
    price_out = np.array([PRICES[m][1] for m in models]) / 1e6
    return prompt_tokens[:, None] * price_in[None, :] + output_tokens * price_out[None, :]


def cost_at(points, target_accuracy: float) -> float:
    """The cheapest mean cost on the curve reaching ``target_accuracy`` (NaN if none does)."""
    hits = [p["cost"] for p in points if p["accuracy"] >= target_accuracy - 1e-12]
    return min(hits) if hits else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    outcomes, tokens = load_rows(args.limit, args.seed)
    models = list(outcomes.models)
    extractor, features, extract_s = extract_cached(args.extractor, args.max_tokens, outcomes.queries, [0.4, 0.5],
                                                    args.progress)
    X = features.select(layers=[12], pooling=["mean"]).features
    prompt_tokens = np.array([len(conversation_text(c)) / 4.0 for c in outcomes.queries])
    real = cost_matrix(prompt_tokens, tokens, models)
    log_tokens = np.log(tokens)
    pool = ModelPool(tuple(PoolModel(name=m, input_cost_per_1m=i, output_cost_per_1m=o, expected_output_tokens=300)
                           for m, (i, o) in PRICES.items()))

    length = {k: [] for k in ("head_mae_log", "mean_mae_log", "head_median_rel", "mean_median_rel")}
    per_model_mae = {m: {"head": [], "mean": []} for m in models}
    routing = {e: {f"cost_at_best-{t:g}": [] for t in TARGETS} | {"auc": []} for e in ESTIMATES}
    singles = []
    for s in tqdm(range(args.splits), desc="splits", disable=not args.progress):
        order = np.random.default_rng(args.seed + 1 + s).permutation(len(outcomes))
        tr, te = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
        train = outcomes.subset(tr)
        router = train_router(train, pool, extractor, layers=[12], pooling="mean", families=("activation",), cv=3,
                              seed=args.seed, progress=False)
        proba = router.probe.predict_proba(X[te])
        head = OutputLengthHead().fit(X[tr], tokens[tr])
        pred_log = head.predict_log(X[te])
        mean_log = log_tokens[tr].mean(axis=0)
        err_head = np.abs(pred_log - log_tokens[te])
        err_mean = np.abs(mean_log[None, :] - log_tokens[te])
        length["head_mae_log"].append(float(err_head.mean()))
        length["mean_mae_log"].append(float(err_mean.mean()))
        length["head_median_rel"].append(float(np.median(np.abs(np.exp(pred_log) / tokens[te] - 1))))
        length["mean_median_rel"].append(float(np.median(np.abs(np.exp(mean_log)[None, :] / tokens[te] - 1))))
        for j, m in enumerate(models):
            per_model_mae[m]["head"].append(float(err_head[:, j].mean()))
            per_model_mae[m]["mean"].append(float(err_mean[:, j].mean()))

        estimated = {
            ESTIMATES[0]: cost_matrix(prompt_tokens[te], np.full((len(te), len(models)), 300.0), models),
            ESTIMATES[1]: cost_matrix(prompt_tokens[te], np.tile(tokens[tr].mean(axis=0), (len(te), 1)), models),
            ESTIMATES[2]: cost_matrix(prompt_tokens[te], head.predict_tokens(X[te]), models),
        }
        correct = outcomes.scores[te]
        singles.append({m: (float(correct[:, j].mean()), float(real[te, j].mean())) for j, m in enumerate(models)})
        best_acc = float(correct.mean(axis=0).max())
        for name, est in estimated.items():
            points = sweep(Policy("utility"), proba, est, router.capability, correct, realised_costs=real[te])
            summary = pool_summary(points, correct, real[te].mean(axis=0), models)
            best_cost = summary["best_model_cost"]
            for t in TARGETS:
                routing[name][f"cost_at_best-{t:g}"].append(cost_at(points, best_acc - t) / best_cost)
            routing[name]["auc"].append(summary["auc"])

    def fmt(values, percent=False):
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(values)
        if not ok.any():
            return "never"
        f = (lambda x: f"{100 * x:.1f}%") if percent else (lambda x: f"{x:.3f}")
        mean, lo, hi = interval(values[ok])
        text = f"{f(mean)} [{f(lo)}, {f(hi)}]" if ok.sum() > 1 else f(mean)
        return text + ("" if ok.all() else f" ({ok.sum()}/{len(values)} splits reach it)")

    single_rows = [[m, f"{np.mean([s[m][0] for s in singles]):.3f}", f"${np.mean([s[m][1] for s in singles]):.6f}",
                    f"{PRICES[m][0]:g} / {PRICES[m][1]:g}", f"{np.exp(log_tokens[:, j].mean()):.0f}",
                    f"{np.percentile(tokens[:, j], 10):.0f}-{np.percentile(tokens[:, j], 90):.0f}"]
                   for j, m in enumerate(models)]
    length_rows = [["length head (read-out ridge, log tokens)", fmt(length["head_mae_log"]),
                    fmt(length["head_median_rel"], True)],
                   ["each model's mean log length", fmt(length["mean_mae_log"]), fmt(length["mean_median_rel"], True)]]
    model_rows = [[m, fmt(per_model_mae[m]["head"]), fmt(per_model_mae[m]["mean"])] for m in models]
    routing_rows = [[e] + [fmt(routing[e][f"cost_at_best-{t:g}"], True) for t in TARGETS] + [fmt(routing[e]["auc"])]
                    for e in ESTIMATES]
    md = (f"# Cost model on MMLU-Pro\n\n{len(outcomes)} rows (the seeded {args.limit}-row subset of "
          f"`routing_pools.py mmlu-pro`, kept where all four models have an answer length), {args.splits} splits "
          f"(half train / half test); extractor {extractor.model_id}, read-out L12 mean; extraction {extract_s:.0f} s "
          f"(0 when cached) on {machine()}. Prices are assumed late-2024 public list prices (USD per 1M "
          "input / output tokens; see the script's docstring). Costs charge the prompt at 4 characters a token and "
          "each model's recorded answer (`output_chars` / 4).\n\n"
          + md_table(["model", "test accuracy", "mean real cost per query", "price in / out", "geometric mean "
                      "tokens", "10th-90th percentile tokens"], single_rows)
          + "\n\n## Output-length prediction (test halves; mean over splits, 95% t-interval)\n\n"
          + md_table(["predictor", "MAE, log tokens", "median relative error of tokens"], length_rows)
          + "\n\n" + md_table(["model", "MAE log tokens, head", "MAE log tokens, model mean"], model_rows)
          + "\n\n## Routing with expected dollars vs a constant cost\n\nThe same success probabilities (activation "
          "probe) through the utility sweep; only the cost estimate differs; every point pays the real cost. "
          "Cost to reach the best single model's accuracy (and 1 or 2 points below it), as a share of the best "
          "model's real cost; frontier AUC over the real-cost axis.\n\n"
          + md_table(["cost estimate", "cost to match the best model", "within 1 point", "within 2 points",
                      "frontier AUC"], routing_rows) + "\n")
    write_results("cost_model_mmlu-pro", md, {"machine": machine(), "n": len(outcomes), "splits": args.splits,
                                              "prices": PRICES, "length": length, "per_model_mae": per_model_mae,
                                              "routing": routing, "singles": singles})


if __name__ == "__main__":
    main()
