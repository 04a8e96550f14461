"""Routing metrics: RouteLLM's APGR / CPT for two-model pools, cost-accuracy frontiers for any pool.

APGR and CPT follow the RouteLLM paper (arXiv 2406.18665, section 3.2): queries are sent
to the strong model in order of the router's score; PGR at each strong-call fraction is
(acc - acc_weak) / (acc_strong - acc_weak); APGR is the area under PGR over fractions
0..1 and CPT(x) the smallest strong-call fraction whose PGR reaches x.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def strong_call_curve(score, weak_correct, strong_correct, seed: int = 0):
    """Accuracy when the top-k queries by ``score`` go to the strong model, for k = 0..n."""
    score = np.asarray(score, dtype=np.float64)
    weak = np.asarray(weak_correct, dtype=np.float64)
    strong = np.asarray(strong_correct, dtype=np.float64)
    n = len(score)
    if n == 0:
        raise ValueError("no rows to evaluate")
    tiebreak = np.random.default_rng(seed).random(n)
    order = np.lexsort((tiebreak, -score))  # descending score, random among ties
    gain = np.r_[0.0, np.cumsum((strong - weak)[order])]
    accuracy = (weak.sum() + gain) / n
    fraction = np.arange(n + 1) / n
    return fraction, accuracy


def apgr_cpt(score, weak_correct, strong_correct, seed: int = 0, thresholds=(0.5, 0.8)) -> dict:
    fraction, accuracy = strong_call_curve(score, weak_correct, strong_correct, seed)
    acc_weak, acc_strong = accuracy[0], accuracy[-1]
    if acc_strong <= acc_weak:
        raise ValueError("the strong model is not more accurate than the weak one on these rows; PGR is undefined")
    pgr = (accuracy - acc_weak) / (acc_strong - acc_weak)
    out: dict[str, Any] = {"apgr": float(np.trapezoid(pgr, fraction))}
    grid = np.linspace(0, 1, 101)
    out["pgr_curve"] = [[float(f), float(v)] for f, v in zip(grid, np.interp(grid, fraction, pgr), strict=False)]
    for x in thresholds:
        reached = np.flatnonzero(pgr >= x - 1e-12)
        out[f"cpt{round(x * 100)}"] = float(fraction[reached[0]]) if len(reached) else None
    return out


def frontier(points: list[dict]) -> list[dict]:
    """Pareto-optimal points (no other point is cheaper and at least as accurate), by cost."""
    best: list[dict] = []
    for p in sorted(points, key=lambda p: (p["cost"], -p["accuracy"])):
        if not best or p["accuracy"] > best[-1]["accuracy"] + 1e-12:
            best.append(p)
    return best


def curve_auc(points: list[dict], cost_min: float, cost_max: float, scored: list[float] | None = None) -> float:
    """Mean accuracy of the cost-accuracy frontier over costs from the cheapest to the dearest model.

    At each budget the best point not above budget counts; below the router's cheapest point
    the cheapest point's accuracy counts, which is what a policy at its cheapest setting gives.
    ``scored``: the accuracy of the same settings on other rows. Points are then chosen by
    ``points`` and valued by ``scored``, which is what a setting picked on one set of labels
    gives on new queries (:func:`~difficulty_router.learning.families.heldout_frontier_auc`).
    """
    cost = np.array([p["cost"] for p in points], dtype=np.float64)
    accuracy = np.array([p["accuracy"] for p in points], dtype=np.float64)
    value = accuracy if scored is None else np.asarray(scored, dtype=np.float64)
    if cost_max <= cost_min:
        return float(value[best_within_budget(cost, accuracy, np.array([np.inf]))[0]])
    grid = np.linspace(cost_min, cost_max, 1001)
    values = value[best_within_budget(cost, accuracy, grid)]
    return float(np.trapezoid(values, grid) / (cost_max - cost_min))


def best_within_budget(cost: np.ndarray, accuracy: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """For each budget, the index of the most accurate point costing no more (the cheaper on a tie).

    Where no point fits the budget, the cheapest point (the most accurate of the cheapest).
    """
    by_cost = np.lexsort((-accuracy, cost))
    best_so_far, best = np.empty(len(by_cost), dtype=int), by_cost[0]
    for k, i in enumerate(by_cost):  # the running best of the frontier, by cost
        if accuracy[i] > accuracy[best] + 1e-12:
            best = i
        best_so_far[k] = best
    within = np.searchsorted(cost[by_cost], budgets + 1e-12, side="right") - 1
    return best_so_far[np.clip(within, 0, None)]


def pool_summary(points: list[dict], correct: np.ndarray, model_costs: np.ndarray, models: list[str]) -> dict:
    """Headline numbers of a cost-accuracy curve against the single models and the oracle."""
    correct = np.asarray(correct, dtype=np.float64)
    accs = correct.mean(axis=0)
    # the best single model: most accurate, the cheaper one on a tie
    best = int(np.lexsort((model_costs, -accs))[0])
    best_acc, best_cost = float(accs[best]), float(model_costs[best])
    oracle_acc = float(correct.max(axis=1).mean())
    matching = [p["cost"] for p in points if p["accuracy"] >= best_acc - 1e-12]
    gap = oracle_acc - best_acc
    return {
        "best_model": models[best],
        "best_model_accuracy": best_acc,
        "best_model_cost": best_cost,
        "oracle_accuracy": oracle_acc,
        "best_accuracy": float(max(p["accuracy"] for p in points)),
        "cost_to_match_best": (min(matching) / best_cost if best_cost > 0 else 0.0) if matching else None,
        "oracle_gap_closed": float(max((p["accuracy"] - best_acc) / gap for p in points)) if gap > 0 else None,
        "auc": curve_auc(points, float(model_costs.min()), float(model_costs.max())),
    }
