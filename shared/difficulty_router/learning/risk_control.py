"""An operating point with a guarantee: within ``epsilon`` of the best single model with probability ``1 - delta``.

Why: the default operating point (:mod:`.operating_point`) is the cheapest swept setting whose accuracy on
out-of-fold rows is within ``max_accuracy_drop`` of the best single model. That is a point estimate: on
unseen queries the drop can be larger, and nothing says how often. Here the same swept settings are
chosen by Learn-then-Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021, arXiv 2110.01052). Each
row's loss is ``d_i = best_i - routed_i`` in [-1, 1] (the most capable eligible model's score minus the
routed model's). For each setting the null hypothesis "the expected drop on unseen queries exceeds
``epsilon``" is tested at level ``delta``; the settings are tested in a fixed order, most conservative
(always the most capable model) to cheapest, and the walk stops at the first setting not rejected
(fixed-sequence testing controls the family-wise error at ``delta`` without splitting it). Every
rejected setting then has expected drop at most ``epsilon``, all at once, with probability at least
``1 - delta``; the cheapest of them is returned. "Always the most capable model" has loss 0 by
construction, so it needs no test and is the fallback when nothing cheaper is rejected (too few rows,
too small an ``epsilon``).

The test: a one-sided betting test (Waudby-Smith & Ramdas 2024, "Estimating means of bounded random
variables by betting", JRSS-B), the wealth ``K_t = prod_i (1 + lambda_i (epsilon - d_i))`` of a
gambler betting that the drop is below ``epsilon``, with the predictable plug-in bet
``lambda_i = min(0.45, sqrt(2 log(1/delta) / (n sigma_{i-1}^2)))`` from the running variance.
Under the null it is a non-negative supermartingale, so by Ville's inequality
``P(max_t K_t >= 1/delta) <= delta``; rows are bet on in a seeded random order. Why this one: the
drop is zero on most rows (both models right, or both wrong) and the bet grows with the inverse of
the variance, so the test is as sharp as the disagreement allows, and it is valid for fractional
scores too. Plain Hoeffding over the range 2 ignores the agreement (its bound is
``sqrt(2 log(1/delta) / n)``, 3.9 points at n = 3000, whatever the rows); the empirical-Bernstein bound
(Maurer & Pontil 2009) uses the variance but pays ``log(2/delta)`` and ``14 log(2/delta) / (3n)`` on top
(half a point at n = 3000). In simulations (n = 500-3000, 5-20% disagreeing rows, true drop 0 or -1
point) this test rejected "drop > 1 point" somewhat more often than a union of exact Clopper-Pearson bounds
on the disagreement rate and the share of disagreements lost (0.74 against 0.67 at n = 3000, 5%
disagreeing), and from 4 to over 50 times as often as empirical Bernstein (0.47 against 0.005 at
n = 1500), while rejecting a true drop of exactly 1 point in at most 9% of runs at
delta = 0.1. The reported upper bound is the smallest ``epsilon`` the same test rejects.

What the guarantee covers: queries from the distribution of the rows given, routed by predictions like
the out-of-fold ones. Two caveats: the deployed probes are refitted on all rows (out-of-fold probes saw
a share less), and the utility margin is fitted on the same rows before the walk (a small reuse).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import numpy as np

from difficulty_router.learning.policies import Policy

DEFAULT_EPSILON = 0.01
DEFAULT_DELTA = 0.1
BET_CAP = 0.45  # keeps 1 + lambda (m - d) > 0 for every m, d in [-1, 1]
ALWAYS_BEST = Policy("utility", 0.0, 1.0)  # the most capable eligible model on every row


def check_levels(epsilon: float, delta: float) -> None:
    """Raise a ValueError naming the bad level: both must be numbers strictly between 0 and 1."""
    for name, value, meaning in (
        ("epsilon", epsilon, "the accuracy drop allowed, 0.01 = 1 point"),
        ("delta", delta, "the probability that the guarantee fails"),
    ):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < float(value) < 1:
            raise ValueError(f"{name} ({meaning}) must be a number in (0, 1), got {value!r}")


def computes_point(max_accuracy_drop: float, guarantee: bool) -> bool:
    """Whether training computes a risk-controlled point: always when it is to be the policy (a bad level
    is then an error), else only where ``max_accuracy_drop`` is a usable ``epsilon`` in (0, 1)."""
    return guarantee or 0 < max_accuracy_drop < 1


def _bets(losses: np.ndarray, delta: float) -> np.ndarray:
    """The predictable plug-in bets: each from the rows before it only (prior mean 0, prior variance 1/4)."""
    n = len(losses)
    t = np.arange(1, n + 1)
    mean = np.cumsum(losses) / (t + 1)
    variance = (0.25 + np.cumsum((losses - mean) ** 2)) / (t + 1)
    before = np.r_[0.25, variance[:-1]]
    return np.minimum(BET_CAP, np.sqrt(2 * np.log(1 / delta) / (n * before)))


def _max_log_wealth(losses: np.ndarray, bets: np.ndarray, level: float) -> float:
    return float(np.cumsum(np.log1p(bets * (level - losses))).max())


def drop_test(losses: np.ndarray, epsilon: float, delta: float, seed: int = 0) -> tuple[bool, float]:
    """(reject "E[loss] > epsilon" at level delta, the 1 - delta upper confidence bound on E[loss]).

    ``losses`` in [-1, 1], one per row, in any order (they are shuffled with ``seed``). The bound is
    the smallest level the same test rejects (the wealth grows with the level, so bisection finds it).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if len(losses) == 0:
        return False, 1.0
    losses = losses[np.random.default_rng(seed).permutation(len(losses))]
    bets = _bets(losses, delta)
    threshold = np.log(1 / delta)
    reject = _max_log_wealth(losses, bets, epsilon) >= threshold
    low, high = -1.0, 1.0
    if _max_log_wealth(losses, bets, high) < threshold:
        return reject, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if _max_log_wealth(losses, bets, mid) >= threshold:
            high = mid
        else:
            low = mid
    return reject, high


def ordered_settings(policy: Policy) -> list[Policy]:
    """The settings of ``policy``'s sweep, most conservative first: the fixed testing order.

    Always the most capable model, then utility ``lambda`` rising from 0 (with the policy's margin), or
    threshold ``tau`` falling from 1; the order is fixed before any row is seen.
    """
    grid = policy.grid()
    values = grid if policy.kind == "utility" else grid[::-1]
    return [ALWAYS_BEST] + [policy.with_value(v) for v in values]


@dataclass
class RiskControlledPoint:
    """The cheapest setting whose expected drop is at most ``epsilon`` with probability ``1 - delta``."""

    policy: Policy
    epsilon: float
    delta: float
    upper_bound: float  # 1 - delta upper confidence bound on the expected drop at this setting
    realised_drop: float  # best model's accuracy minus this setting's, on the rows given
    accuracy: float
    cost: float  # mean realised cost per query on the rows given
    best_cost: float  # the same for always calling the most capable model
    n: int
    tested: int  # settings tested before the walk stopped (the always-best one not counted)
    fallback: bool  # True when no cheaper setting was certified: always the most capable model

    def info(self) -> dict:
        """What ``router.info["risk_controlled_operating_point"]`` keeps."""
        return {
            "rule": "Learn-then-Test, fixed-sequence, betting test (Waudby-Smith & Ramdas)",
            "policy": self.policy.to_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "upper_bound": self.upper_bound,
            "realised_drop": self.realised_drop,
            "accuracy": self.accuracy,
            "cost": self.cost,
            "cost_share_of_best": self.cost / self.best_cost if self.best_cost > 0 else None,
            "n": self.n,
            "tested": self.tested,
            "fallback": self.fallback,
        }


def _check_arrays(proba, scores, costs, realised, eligible) -> tuple[np.ndarray, ...]:
    proba, scores = np.asarray(proba, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] == 0 or proba.shape[1] == 0:
        raise ValueError(f"proba must be a non-empty (rows, models) array, got shape {proba.shape}")
    if scores.shape != proba.shape:
        raise ValueError(f"scores must have proba's shape {proba.shape}, got {scores.shape}")
    if not (np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()):
        raise ValueError("scores must be finite and lie in [0, 1]")
    if not np.isfinite(proba).all():
        raise ValueError("proba must be finite")
    costs = np.asarray(costs, dtype=np.float64)
    realised = costs if realised is None else np.asarray(realised, dtype=np.float64)
    for name, array in (("costs", costs), ("realised", realised)):
        if array.shape != proba.shape:
            raise ValueError(f"{name} must have proba's shape {proba.shape}, got {array.shape}")
    if eligible is not None and np.shape(eligible) != proba.shape:
        raise ValueError(f"eligible must have proba's shape {proba.shape}, got {np.shape(eligible)}")
    return proba, scores, costs, realised


def risk_controlled_point(
    policy: Policy,
    proba: np.ndarray,
    scores: np.ndarray,
    costs: np.ndarray,
    capability: np.ndarray,
    realised: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
    *,
    epsilon: float = DEFAULT_EPSILON,
    delta: float = DEFAULT_DELTA,
    seed: int = 0,
) -> RiskControlledPoint:
    """The cheapest of ``policy``'s settings certified within ``epsilon`` of the best model (module docstring).

    ``proba`` (n, m): predictions for rows the predictor did not fit (out-of-fold or held out);
    ``scores`` (n, m): the rows' labels in [0, 1]; ``costs``: the prices the policy sees;
    ``realised``: what the rows actually cost (default ``costs``); ``capability``: each model's
    accuracy in training (ranks the models); ``eligible`` (n, m): which models may serve each row.
    """
    check_levels(epsilon, delta)
    proba, scores, costs, realised = _check_arrays(proba, scores, costs, realised, eligible)
    capability = np.asarray(capability, dtype=np.float64)
    if capability.shape != (proba.shape[1],):
        raise ValueError(f"capability must have one entry per model ({proba.shape[1]}), got shape {capability.shape}")
    n, rows = len(scores), np.arange(len(scores))
    best = ALWAYS_BEST.choose(proba, costs, capability, eligible)
    reference, best_cost = scores[rows, best], float(realised[rows, best].mean())
    certified = [(ALWAYS_BEST, best, 0.0)]
    tested = 0
    for setting in ordered_settings(policy)[1:]:
        chosen = setting.choose(proba, costs, capability, eligible)
        tested += 1
        reject, bound = drop_test(reference - scores[rows, chosen], epsilon, delta, seed)
        if not reject:
            break
        certified.append((setting, chosen, bound))
    setting, chosen, bound = min(certified, key=lambda c: (realised[rows, c[1]].mean(), -scores[rows, c[1]].mean()))
    accuracy = float(scores[rows, chosen].mean())
    return RiskControlledPoint(
        policy=setting,
        epsilon=float(epsilon),
        delta=float(delta),
        upper_bound=float(bound),
        realised_drop=float(reference.mean()) - accuracy,
        accuracy=accuracy,
        cost=float(realised[rows, chosen].mean()),
        best_cost=best_cost,
        n=n,
        tested=tested,
        fallback=setting is ALWAYS_BEST,
    )
