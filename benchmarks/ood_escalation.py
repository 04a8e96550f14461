"""Out-of-distribution escalation: does sending novel queries to the most capable model help on a shifted test set?

Train a router on one group of MMLU-Pro categories, then route (a) held-out questions of the
same group (in distribution) and (b) questions of the other group (shifted). For each, the
routed traffic's accuracy and mean cost with OOD escalation off and on (novelty above the
``--percentile`` of out-of-fold training scores -> the most capable model), the share of queries
escalated, and the paired difference with a 95% interval from a bootstrap of the test rows.
Both directions of the split are run (STEM -> rest and rest -> STEM).

    python benchmarks/ood_escalation.py --limit 3000 --percentile 95

Features come from the shared feature cache (the same 3,000 rows and read-out as
``routing_pools.py mmlu-pro``), so a second run extracts nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import extract_cached, machine, md_table, need_data, write_results
from routing_pools import MMLU_PRO_LADDER

from difficulty_router import ModelPool, PoolModel, load_mmlu_pro, train_router
from difficulty_router.learning.novelty import OODPolicy

STEM = {"math", "physics", "chemistry", "engineering", "computer science"}


def routed(router, features: np.ndarray, conversations, scores: np.ndarray, costs: np.ndarray, enabled: bool):
    """(per-row correctness, per-row cost, escalated mask) of the router's choices on precomputed read-outs."""
    router = copy.copy(router)
    router.ood = OODPolicy(enabled=enabled, percentile=router.ood.percentile)
    proba = router.proba_from(conversations, features)
    eligible = router.eligibility(len(features), None)
    chosen = router.policy.choose(proba, costs, router.capability, eligible)
    ood = np.zeros(len(features), dtype=bool)
    if enabled:
        ood = router.novelty.percentile(features) > router.ood.percentile
        order = router.capability_order()
        for i in np.flatnonzero(ood):
            chosen[i] = router._ood_target(eligible[i], order)
    rows = np.arange(len(features))
    return scores[rows, chosen], costs[rows, chosen], ood


def interval(values: np.ndarray, boot: np.ndarray) -> str:
    stats = values[boot].mean(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return f"{values.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--layers", nargs="+", type=float, default=[0.4, 0.5])
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--percentile", type=float, default=95.0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    outcomes = load_mmlu_pro(need_data("mmlu_pro"), models=list(MMLU_PRO_LADDER))
    if args.limit and args.limit < len(outcomes):
        outcomes = outcomes.subset(np.sort(np.random.default_rng(args.seed).choice(len(outcomes), args.limit,
                                                                                    replace=False)))
    pool = ModelPool(tuple(PoolModel(name=m, input_cost_per_1m=i, output_cost_per_1m=o, expected_output_tokens=300)
                           for m, (i, o) in MMLU_PRO_LADDER.items()))
    extractor, features, extract_s = extract_cached(args.extractor, args.max_tokens, outcomes.queries, args.layers,
                                                    progress=False)
    layer = features.layers[0]
    X = features.select(layers=(layer,), pooling=("mean",)).features
    category = np.array(outcomes.extra["category"])
    stem = np.isin(category, list(STEM))
    rng = np.random.default_rng(args.seed)
    rows, payload = [], {"machine": machine(), "percentile": args.percentile, "limit": args.limit,
                         "layer": int(layer), "pooling": "mean", "directions": []}
    for name, group in (("STEM -> other", stem), ("other -> STEM", ~stem)):
        inside = np.flatnonzero(group)
        order = rng.permutation(inside)
        train_idx, held_idx = np.sort(order[: int(0.7 * len(order))]), np.sort(order[int(0.7 * len(order)):])
        shifted_idx = np.flatnonzero(~group)
        train = outcomes.subset(train_idx)
        router = train_router(train, pool, extractor, layers=[int(layer)], pooling="mean", families=("activation",),
                              seed=args.seed, progress=False)
        router.ood = OODPolicy(percentile=args.percentile)
        direction = {"direction": name, "train_rows": len(train_idx), "sets": []}
        for label, idx in (("in distribution (held-out, same categories)", held_idx),
                           ("shifted (the other categories)", shifted_idx)):
            test = outcomes.subset(idx)
            costs = router.estimated_costs(test)
            off_correct, off_cost, _ = routed(router, X[idx], test.queries, test.scores, costs, False)
            on_correct, on_cost, ood = routed(router, X[idx], test.queries, test.scores, costs, True)
            boot = rng.integers(0, len(idx), size=(args.bootstrap, len(idx)))
            top = int(np.argmax(router.capability))
            best = test.scores[:, top]
            best_cost = costs[:, top]
            # the same number of escalations spent at random: is it the novelty or just the extra spend?
            random_acc = []
            for _ in range(200):
                pick = rng.choice(len(idx), int(ood.sum()), replace=False)
                acc = off_correct.copy()
                acc[pick] = best[pick]
                random_acc.append(acc.mean())
            rows.append([name, label, len(idx), f"{100 * ood.mean():.1f}%",
                         interval(off_correct, boot), interval(on_correct, boot), interval(on_correct - off_correct, boot),
                         f"{np.mean(random_acc):.3f}",
                         f"{1e6 * off_cost.mean():.0f}", f"{1e6 * on_cost.mean():.0f}",
                         f"{best.mean():.3f} / {1e6 * best_cost.mean():.0f}"])
            direction["sets"].append({
                "set": label, "n": len(idx), "escalated_share": float(ood.mean()),
                "accuracy_off": float(off_correct.mean()), "accuracy_on": float(on_correct.mean()),
                "accuracy_gain_ci95": list(np.percentile((on_correct - off_correct)[boot].mean(1), [2.5, 97.5])),
                "accuracy_random_escalation": float(np.mean(random_acc)),
                "cost_off_per_query": float(off_cost.mean()), "cost_on_per_query": float(on_cost.mean()),
                "most_capable_accuracy": float(best.mean()), "most_capable_cost": float(best_cost.mean())})
        payload["directions"].append(direction)

    table = md_table(["trained on -> shifted to", "test set", "rows", "escalated", "accuracy, OOD off",
                      "accuracy, OOD on", "gain", "accuracy, as many escalated at random",
                      "cost/1M queries, off ($)", "on ($)",
                      "most capable model: accuracy / cost ($)"], rows)
    markdown = (
        f"# Out-of-distribution escalation on MMLU-Pro\n\n"
        f"Seven-model ladder of `routing_pools.py` ({args.limit} seeded rows), router trained on 70% of one category "
        f"group (activation probe, layer {layer}, mean pooling of {extractor.model_id}, max {args.max_tokens} tokens), "
        f"tested on the other 30% of that group (in distribution) and on every row of the other group (shifted). "
        f"STEM = {sorted(STEM)}; other = the remaining MMLU-Pro categories. OOD escalation: novelty (Mahalanobis "
        f"distance under a 32-component probabilistic PCA of the z-scored read-out) above the {args.percentile:g}th "
        f"percentile of out-of-fold training scores sends the query to the most capable model. Accuracy and the "
        f"paired gain with 95% intervals from {args.bootstrap} bootstrap resamples of the test rows; \"as many "
        f"escalated at random\" sends the same number of queries to the most capable model at random (mean of 200 "
        f"draws), to tell the novelty score from the extra spend; cost is the estimated price per million queries. Machine: {machine()}.\n\n{table}\n\n"
        f"Command: `python benchmarks/ood_escalation.py --limit {args.limit} --percentile {args.percentile:g}`\n")
    write_results(f"ood_escalation_p{args.percentile:g}", markdown, payload)


if __name__ == "__main__":
    main()
