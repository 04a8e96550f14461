"""The risk-controlled operating point against the point-estimate rule, on held-out rows (issue 29, item 4).

Per pool and split: fit the success predictor on the train half, take its out-of-fold predictions on the
train half, choose two operating points of the utility policy from them with
:func:`~difficulty_router.training.operating_point.default_operating_point` (the code ``train_router``
runs): the point estimate (cheapest setting within ``--epsilon`` of the best model out of fold) and the
risk-controlled point (Learn-then-Test: expected drop <= epsilon with probability >= 1 - delta). Both
are then evaluated on the test half: the drop from the best single model (the one most accurate in
training) on those rows, whether it exceeds epsilon, and the cost as a share of that model's cost.

Predictor: TF-IDF word 1-2-grams and one L2 logistic regression per model (C = 1, liblinear), out of fold by 5-fold
cross-validation on the train half and refitted on all of it for the test half. Not the SmolLM2 read-out
(not cached on this machine; extracting it does not fit the time budget) and not the router's tuned
lexical family (about 2 minutes per fit on the 2-core machine, 15 fits): a weaker predictor, which
is what the rule under test has to cope with anyway; it only sees predictions.
Dominated models are dropped on the training rows (less those the out-of-fold predictions keep as
complementary) and the utility margin is fitted as in training.

Pools, prices and splits are :mod:`routing_pools`'s (half train / half test of a seeded 3,000-row
subset for MMLU-Pro; LLMRouter trains on 80% of a 2,000-row subset and tests on its 500-row test file).

    python benchmarks/risk_control.py --splits 5 --epsilon 0.01 --delta 0.1
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
from _common import machine, md_table, write_results
from routing_pools import load
from routing_routellm import interval
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold

from difficulty_router.data.queries import conversation_text
from difficulty_router.learning.policies import Policy, complementary, dominated
from difficulty_router.routing.calibration import realised_costs
from difficulty_router.training.operating_point import default_operating_point

POOLS = {"mmlu-pro": 3000, "mmlu-pro-5": 3000, "llmrouter": 2000}
TITLES = {
    "mmlu-pro": "MMLU-Pro 7-model ladder",
    "mmlu-pro-5": "MMLU-Pro 5-model pool",
    "llmrouter": "LLMRouter 9 models",
}


def tfidf_proba(train_texts, train_scores, test_texts, seed, folds=5) -> tuple[np.ndarray, np.ndarray]:
    """(out-of-fold P(success) on the train rows, P(success) on the test rows): TF-IDF + logistic per model."""

    def fit_predict(tr_texts, Y, te_texts):
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50_000)
        X, Z = vectorizer.fit_transform(tr_texts), vectorizer.transform(te_texts)
        out = np.empty((Z.shape[0], Y.shape[1]))
        for j in range(Y.shape[1]):
            hard = (Y[:, j] >= 0.5).astype(int)
            if hard.min() == hard.max():
                out[:, j] = Y[:, j].mean()
                continue
            out[:, j] = LogisticRegression(C=1.0, solver="liblinear").fit(X, hard).predict_proba(Z)[:, 1]
        return out

    train_texts, Y = np.asarray(train_texts, dtype=object), np.asarray(train_scores, dtype=np.float64)
    oof = np.empty_like(Y)
    for fit_rows, held in KFold(folds, shuffle=True, random_state=seed).split(train_texts):
        oof[held] = fit_predict(list(train_texts[fit_rows]), Y[fit_rows], list(train_texts[held]))
    return oof, fit_predict(list(train_texts), Y, list(test_texts))


def one_split(outcomes, pool, train_idx, test_idx, epsilon, delta, seed) -> dict:
    train, test = outcomes.subset(train_idx), outcomes.subset(test_idx)
    texts = {
        "train": [conversation_text(c) for c in train.queries],
        "test": [conversation_text(c) for c in test.queries],
    }
    costs = {k: pool.costs([len(t) for t in v]) for k, v in texts.items()}
    realised = {"train": realised_costs(train, costs["train"]), "test": realised_costs(test, costs["test"])}
    oof, proba = tfidf_proba(texts["train"], train.scores, texts["test"], seed)
    capability = train.scores.mean(axis=0)
    dropped = dominated(capability, realised["train"].mean(axis=0), pool.names)
    kept = complementary(oof, train.scores, costs["train"], capability, dropped, pool.names)
    usable = np.array([m not in dropped or m in kept for m in pool.names])

    def eligibility(n, _exclude):
        return np.broadcast_to(usable, (n, len(usable))).copy()

    stub = SimpleNamespace(policy=Policy("utility"), capability=capability, eligibility=eligibility)
    point = default_operating_point(
        stub, oof, train.scores, costs["train"], realised["train"], max_accuracy_drop=epsilon, seed=seed
    )
    risk = point.risk_controlled
    assert risk is not None
    best, rows = int(np.argmax(capability)), np.arange(len(test))
    best_acc, best_cost = float(test.scores[:, best].mean()), float(realised["test"][:, best].mean())
    out = {"oof_bound": risk.upper_bound, "fallback": risk.fallback, "oof_realised": risk.realised_drop}
    eligible = eligibility(len(test), None)
    for name, policy in (("point estimate", point.policy), ("risk-controlled", risk.policy)):
        chosen = policy.choose(proba, costs["test"], capability, eligible)
        out[name] = {
            "policy": policy.to_dict(),
            "test_drop": best_acc - float(test.scores[rows, chosen].mean()),
            "cost_share": float(realised["test"][rows, chosen].mean()) / best_cost,
            "oof_drop": float(train.scores[:, best].mean())
            - float(
                train.scores[
                    np.arange(len(train)), policy.choose(oof, costs["train"], capability, eligibility(len(train), None))
                ].mean()
            ),
        }
    return out


def splits_of(kind: str, outcomes, fixed_test, splits: int, seed: int):
    for s in range(splits):
        rng = np.random.default_rng(seed + 1 + s)  # routing_pools' splits
        if fixed_test is None:
            order = rng.permutation(len(outcomes))
            yield np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
        else:
            rows = np.arange(fixed_test[0])
            yield np.sort(rng.choice(rows, int(0.8 * len(rows)), replace=False)), fixed_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results, rows = {}, []
    start = time.perf_counter()
    for kind in args.pools:
        outcomes, pool, fixed_test = load(kind, POOLS[kind], args.seed)
        runs = []
        for s, (train_idx, test_idx) in enumerate(splits_of(kind, outcomes, fixed_test, args.splits, args.seed)):
            runs.append(one_split(outcomes, pool, train_idx, test_idx, args.epsilon, args.delta, args.seed))
            r = runs[-1]
            print(
                f"{kind} split {s}: point estimate drop {r['point estimate']['test_drop']:+.4f} at "
                f"{100 * r['point estimate']['cost_share']:.1f}%; risk-controlled drop "
                f"{r['risk-controlled']['test_drop']:+.4f} at {100 * r['risk-controlled']['cost_share']:.1f}% "
                f"(bound {r['oof_bound']:+.4f}, fallback {r['fallback']}); {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        results[kind] = runs
        n_train, n_test = len(train_idx), len(test_idx)
        for name in ("point estimate", "risk-controlled"):
            drops = [r[name]["test_drop"] for r in runs]
            shares = [r[name]["cost_share"] for r in runs]
            mean, lo, hi = interval(drops)
            cmean, clo, chi = interval(shares)
            extra = (
                (
                    f"bound {100 * np.mean([r['oof_bound'] for r in runs]):+.2f} pt; best model in "
                    f"{sum(r['fallback'] for r in runs)}/{len(runs)}"
                )
                if name == "risk-controlled"
                else "-"
            )
            rows.append(
                [
                    f"{TITLES[kind]} ({n_train}/{n_test})",
                    name,
                    f"{100 * np.mean([r[name]['oof_drop'] for r in runs]):+.2f}",
                    f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]",
                    f"{sum(d > args.epsilon for d in drops)}/{len(drops)}",
                    f"{100 * cmean:.1f}% [{100 * clo:.1f}, {100 * chi:.1f}]",
                    extra,
                ]
            )
    md = (
        f"Risk-controlled operating point vs the point estimate: epsilon {args.epsilon:g} "
        f"({100 * args.epsilon:g} accuracy point), delta {args.delta:g}, {args.splits} splits; predictor: "
        "TF-IDF + logistic regression per model (out of fold on the train half); "
        f"{time.perf_counter() - start:.0f} s on {machine()}.\n\n"
        "Drop: the best single model's accuracy (the model most accurate in training) minus the routed "
        "accuracy, in points, out of fold on the train rows and on the test rows (mean over splits, 95% "
        "t-interval). Violations: splits whose test drop exceeds epsilon (the guarantee is on the expected "
        "drop; a finite test half adds its own noise). Cost: the routed mean cost as a share of the best "
        "model's on the test rows. Bound: the mean out-of-fold upper confidence bound of the risk-controlled "
        'point on the drop, in points; "best model in k/n": splits where nothing cheaper than the best model '
        "was certified.\n\n"
        + md_table(
            [
                "pool (train/test rows)",
                "rule",
                "out-of-fold drop",
                "test drop (points)",
                f"violations (> {100 * args.epsilon:g} pt)",
                "cost, % of best",
                "risk control",
            ],
            rows,
        )
        + "\n\nCommand: `python benchmarks/risk_control.py "
        + f"--splits {args.splits} --epsilon {args.epsilon:g} "
        f"--delta {args.delta:g}`\n"
    )
    write_results(
        "risk_control",
        md,
        {"machine": machine(), "epsilon": args.epsilon, "delta": args.delta, "splits": args.splits, "results": results},
    )


if __name__ == "__main__":
    main()
