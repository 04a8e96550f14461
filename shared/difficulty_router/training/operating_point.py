"""A trained router's default operating point, chosen on predictions for rows its probes did not fit.

Both ways of training end the same way: the in-memory fit (:func:`~difficulty_router.training.train.train_router`)
on out-of-fold probabilities, the streamed shard fit (:mod:`difficulty_router.scale.shard_training`) on a
held-out share of the rows. The utility policy's margin is fitted first
(:func:`~difficulty_router.learning.policies.fit_margin`); then each policy kind (utility, threshold) is
swept and its point is the cheapest one within ``max_accuracy_drop`` of the best single model (the most
accurate point when none reaches it). With two models each kind's APGR and CPT are recorded too. The
chosen kind's point becomes the router's policy; :meth:`OperatingPoint.info` is what the manifest keeps.

Next to it, the risk-controlled point of the router's kind (:mod:`~difficulty_router.learning.risk_control`):
the cheapest setting whose expected drop on unseen queries is at most ``max_accuracy_drop`` with probability
``1 - delta``, with its upper bound and realised drop. It is always recorded (``max_accuracy_drop`` in (0, 1));
with ``guarantee=True`` it is the policy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from difficulty_router.core.metrics import apgr_cpt
from difficulty_router.learning.policies import Policy, fit_margin, pick_operating_point, sweep
from difficulty_router.learning.risk_control import (
    DEFAULT_DELTA,
    RiskControlledPoint,
    computes_point,
    risk_controlled_point,
)
from difficulty_router.routing.router import DifficultyRouter

POLICY_KINDS = ("utility", "threshold")


@dataclass
class OperatingPoint:
    """The chosen policy, every kind's point (``comparison``) and the fitted utility margin."""

    policy: Policy
    comparison: dict[str, dict]
    margin: float
    margin_table: list[dict]
    max_accuracy_drop: float
    risk_controlled: RiskControlledPoint | None = None
    risk_control_skipped: str | None = None  # why no risk-controlled point was computed
    guarantee: bool = False

    def info(self) -> dict:
        """The ``router.info`` entries: the policy comparison, the margin fit, the default and guaranteed points."""
        risk = (
            self.risk_controlled.info() if self.risk_controlled is not None else {"skipped": self.risk_control_skipped}
        )
        if self.guarantee:  # the risk-controlled point is the policy
            default = {"max_accuracy_drop": self.max_accuracy_drop, **risk, "rule": f"risk-controlled: {risk['rule']}"}
        else:
            default = {"max_accuracy_drop": self.max_accuracy_drop, **self.comparison[self.policy.kind]["point"]}
        return {
            "out_of_fold_policies": self.comparison,
            "utility_margin": {"margin": self.margin, "candidates": self.margin_table},
            "default_operating_point": default,
            "risk_controlled_operating_point": risk,
        }


def default_operating_point(
    router: DifficultyRouter,
    proba: np.ndarray,
    scores: np.ndarray,
    costs: np.ndarray,
    realised: np.ndarray,
    *,
    max_accuracy_drop: float,
    seed: int = 0,
    guarantee: bool = False,
    delta: float = DEFAULT_DELTA,
) -> OperatingPoint:
    """The operating point of ``router``'s policy kind from its predictions ``proba`` (n, m) on labelled rows.

    ``scores``: the rows' labels (n, m); ``costs``: the prices the policy sees; ``realised``: what the rows
    actually cost. The router gives each model's training accuracy (``capability``) and which models may
    serve (dominated ones are dropped); it is not changed: the caller sets ``router.policy = point.policy``.
    See the module docstring for the rule. ``guarantee``: the policy is the risk-controlled point
    (``epsilon = max_accuracy_drop``, ``delta``) instead of the point estimate.
    """
    kind, capability = router.policy.kind, router.capability
    if kind not in POLICY_KINDS:
        raise ValueError(f"policy must be one of {POLICY_KINDS}, got {kind!r}")
    eligible = router.eligibility(len(proba), None)
    margin, margin_table = fit_margin(proba, scores, costs, capability, eligible)
    target = float(capability.max()) - max_accuracy_drop
    comparison: dict[str, dict] = {}
    for candidate in POLICY_KINDS:
        setting = Policy(candidate, margin=margin if candidate == "utility" else 0.0)
        points = sweep(setting, proba, costs, capability, scores, realised, eligible)
        try:
            point = pick_operating_point(points, Policy(candidate).parameter, target_accuracy=target)
        except ValueError:  # no point reaches the target: the most accurate one, the cheaper of equals
            point = max(points, key=lambda p: (p["accuracy"], -p["cost"]))
        comparison[candidate] = {"point": point}
    if proba.shape[1] == 2:
        weak, strong = np.argsort(capability)
        routing_scores = {"utility": proba[:, strong] - proba[:, weak], "threshold": 1 - proba[:, weak]}
        for candidate, score in routing_scores.items():
            with contextlib.suppress(ValueError):  # the strong model no better on these rows: no APGR
                comparison[candidate].update(apgr_cpt(score, scores[:, weak], scores[:, strong], seed))
    risk, skipped = None, None
    if computes_point(max_accuracy_drop, guarantee):
        setting = Policy(kind, margin=margin if kind == "utility" else 0.0)
        risk = risk_controlled_point(
            setting,
            proba,
            scores,
            costs,
            capability,
            realised,
            eligible,
            epsilon=max_accuracy_drop,
            delta=delta,
            seed=seed,
        )
    else:
        skipped = f"max_accuracy_drop {max_accuracy_drop} is not in (0, 1)"
    policy = risk.policy if guarantee and risk is not None else Policy.from_point(kind, comparison[kind]["point"])
    return OperatingPoint(policy, comparison, margin, margin_table, max_accuracy_drop, risk, skipped, guarantee)
