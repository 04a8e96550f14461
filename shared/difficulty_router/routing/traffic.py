"""Calibration on unlabelled traffic: set a router's operating point from a sample of the user's own prompts.

Without labels, accuracy cannot be measured, but the share of calls each model gets and
their cost can: both follow from the router's decisions on the prompts alone. So the
operating point is stated as a share of traffic for the most capable model
(``strong_share``), a share per model (``shares``, ladder routers only) or a budget in
dollars per 1,000 queries (``max_cost_per_1k``, from the pool's prices and the prompts'
lengths). A zero-label ladder router (:mod:`.pretrained`) moves its difficulty boundaries
to quantiles of the prompts' difficulties, which meets the shares exactly on those prompts
(up to ties); a trained router moves the one knob of its policy (lambda or tau) by bisection
to the setting whose share of strong calls is nearest the target, or, under a budget, the
setting with the highest predicted accuracy (mean P(success) of the chosen models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from difficulty_router.data.queries import conversation_text, to_conversations
from difficulty_router.learning.policies import Policy
from difficulty_router.routing.pretrained import (
    check_shares,
    is_ladder,
    ladder_boundaries,
    ladder_difficulty,
    set_ladder,
)

MIN_PROMPTS = 20


def _check_target(strong_share, shares, max_cost_per_1k) -> None:
    given = [x is not None for x in (strong_share, shares, max_cost_per_1k)]
    if sum(given) != 1:
        raise ValueError("give exactly one of strong_share, shares or max_cost_per_1k")
    if strong_share is not None and (
        isinstance(strong_share, bool) or not isinstance(strong_share, (int, float)) or not 0 <= strong_share <= 1
    ):
        raise ValueError(f"strong_share must be a number in [0, 1], got {strong_share!r}")
    if max_cost_per_1k is not None and (
        isinstance(max_cost_per_1k, bool)
        or not isinstance(max_cost_per_1k, (int, float))
        or not np.isfinite(max_cost_per_1k)
        or max_cost_per_1k < 0
    ):
        raise ValueError(f"max_cost_per_1k must be a finite non-negative number, got {max_cost_per_1k!r}")


def _ladder_shares(strong_share: float, k: int) -> np.ndarray:
    """The top rung gets ``strong_share``; the rest is split evenly among the cheaper rungs."""
    return np.r_[np.full(k - 1, (1 - strong_share) / (k - 1)), strong_share]


def calibrate_unlabelled(
    router,
    prompts: Sequence[Any],
    *,
    strong_share: float | None = None,
    shares: Sequence[float] | None = None,
    max_cost_per_1k: float | None = None,
    progress: bool | None = None,
) -> dict:
    """Set ``router``'s operating point from ``prompts`` (strings or chat conversations); returns a report
    with the realised share per model and the mean estimated cost per 1,000 queries on those prompts."""
    _check_target(strong_share, shares, max_cost_per_1k)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"unlabelled prompts must be a list of prompts, got {type(prompts).__name__}")
    if len(prompts) < MIN_PROMPTS:
        raise ValueError(f"calibration needs at least {MIN_PROMPTS} unlabelled prompts, got {len(prompts)}")
    conversations = to_conversations(prompts)
    features = router.features(conversations, progress).features
    costs = router.pool.costs([len(conversation_text(c)) for c in conversations])
    eligible = router.eligibility(len(conversations), None)
    top = router.models.index(router.capability_order()[-1])
    if is_ladder(router):
        k = len(router.models)
        if shares is not None and len(shares) != k:
            raise ValueError(f"shares must give one share per pool model ({k}), got {len(shares)}")
        difficulty = ladder_difficulty(router, features)

        def apply(share_values: np.ndarray) -> np.ndarray:
            set_ladder(router, ladder_boundaries(difficulty, share_values), share_values, f"{len(prompts)} prompts")
            proba = router.proba_from(conversations, features)
            return router.policy.choose(proba, costs, router.capability, eligible)

        if max_cost_per_1k is not None:
            best = None
            for s in np.linspace(0, 1, 201):  # the most strong calls the budget allows
                chosen = apply(_ladder_shares(float(s), k))
                if 1000 * costs[np.arange(len(chosen)), chosen].mean() <= max_cost_per_1k + 1e-12:
                    best = float(s)
            if best is None:
                raise ValueError(_over_budget(costs, eligible, max_cost_per_1k))
            strong_share = best
        target = check_shares(shares, k) if shares is not None else _ladder_shares(float(strong_share or 0.0), k)
        chosen = apply(target)
    else:
        if shares is not None:
            raise ValueError("per-model shares need a zero-label ladder router; give strong_share or max_cost_per_1k")
        proba = router.proba_from(conversations, features)
        kind = router.policy.kind
        margin = router.utility_margin if kind == "utility" else 0.0

        def decide(value: float) -> np.ndarray:
            return Policy(kind, float(value), margin).choose(proba, costs, router.capability, eligible)

        grid = Policy(kind, margin=margin).grid()
        if max_cost_per_1k is not None:
            rows = np.arange(len(conversations))
            feasible = []
            for value in grid:
                chosen = decide(value)
                if 1000 * costs[rows, chosen].mean() <= max_cost_per_1k + 1e-12:
                    feasible.append((proba[rows, chosen].mean(), -costs[rows, chosen].mean(), value))
            if not feasible:
                raise ValueError(_over_budget(costs, eligible, max_cost_per_1k))
            value = max(feasible)[2]
        else:
            value = _bisect_share(decide, grid, top, float(strong_share or 0.0), kind)
        router.policy = Policy(kind, float(value), margin)
        chosen = decide(value)
    rows = np.arange(len(conversations))
    realised = np.bincount(chosen, minlength=len(router.models)) / len(chosen)
    report = {
        "n": len(prompts),
        "target": {
            "strong_share": strong_share,
            "shares": None if shares is None else list(shares),
            "max_cost_per_1k": max_cost_per_1k,
        },
        "shares": dict(zip(router.models, realised.tolist(), strict=True)),
        "strong_model": router.models[top],
        "strong_share": float(realised[top]),
        "cost_per_1k": float(1000 * costs[rows, chosen].mean()),
        "policy": router.policy.to_dict(),
    }
    router.info["calibration"] = {"unlabelled": report}
    return report


def _bisect_share(decide, grid: np.ndarray, top: int, target: float, kind: str) -> float:
    """The policy value whose share of ``top`` is nearest ``target``.

    The share of the most capable model rises with tau and falls with lambda; the grid brackets
    the target, then bisection narrows the bracket.
    """
    shares = np.array([(decide(v) == top).mean() for v in grid])
    best = int(np.argmin(np.abs(shares - target)))
    # a neighbour on the other side of the target brackets it
    lo, hi = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)])
    best_value, best_gap = float(grid[best]), abs(shares[best] - target)
    rising = kind == "threshold"
    for _ in range(40):
        mid = (lo + hi) / 2
        share = (decide(mid) == top).mean()
        if abs(share - target) < best_gap:
            best_value, best_gap = mid, abs(share - target)
        if (share < target) == rising:
            lo = mid
        else:
            hi = mid
    return best_value


def _over_budget(costs: np.ndarray, eligible: np.ndarray, budget: float) -> str:
    cheapest = 1000 * np.where(eligible, costs, np.inf).min(axis=1).mean()
    return f"max_cost_per_1k {budget:g} is below the cheapest routing of these prompts ({cheapest:.6g} per 1,000)"
