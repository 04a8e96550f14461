"""Setting a router's operating point on labelled rows of your own: the cost-accuracy curve and the pick.

A router trained on one corpus meets other traffic; its policy's knob (a threshold, a utility
margin, ...) is then re-chosen on labelled rows from that traffic: best accuracy under a cost,
the cheapest setting that reaches an accuracy, or the cheapest within some points of the best single
model, either on these rows or, with ``delta``, with a guarantee for unseen queries
(:mod:`~difficulty_router.learning.risk_control`). Without labels, :mod:`.traffic` does the same from the
share of calls each model gets. The router is passed in, so this module does not import the router module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from difficulty_router.data.outcomes import Outcomes
from difficulty_router.learning.policies import Policy, pick_operating_point, sweep
from difficulty_router.learning.risk_control import risk_controlled_point
from difficulty_router.routing.traffic import calibrate_unlabelled


def realised_costs(outcomes: Outcomes, estimated: np.ndarray) -> np.ndarray:
    """Logged per-query costs where the outcomes have them, estimates elsewhere."""
    if outcomes.cost is None:
        return estimated
    return np.where(np.isnan(outcomes.cost), estimated, outcomes.cost)


def operating_curve(
    router: Any, outcomes: Outcomes, kind: str | None = None, proba: np.ndarray | None = None
) -> list[dict]:
    """Accuracy and cost at every setting of the router's policy on labelled rows
    (:meth:`DifficultyRouter.operating_curve`)."""
    outcomes = outcomes.select_models(router.models)
    if proba is None:
        proba = router.predict_proba(outcomes.queries)
    costs = router.estimated_costs(outcomes)
    kind = kind or router.policy.kind
    policy = Policy(kind, margin=router.utility_margin if kind == "utility" else 0.0)
    return sweep(
        policy,
        proba,
        costs,
        router.capability,
        outcomes.scores,
        realised_costs=realised_costs(outcomes, costs),
        eligible=router.eligibility(len(outcomes), None),
    )


def calibrate_router(
    router: Any,
    outcomes: Outcomes | None = None,
    *,
    target_cost: float | None = None,
    target_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
    delta: float | None = None,
    kind: str | None = None,
    proba: np.ndarray | None = None,
    seed: int = 0,
    unlabelled: Sequence[Any] | None = None,
    strong_share: float | None = None,
    shares: Sequence[float] | None = None,
    max_cost_per_1k: float | None = None,
    progress: bool | None = None,
) -> dict:
    """Set the policy's knob on labelled traffic of your own, or on unlabelled prompts.

    ``target_cost``: best accuracy at a mean cost per query no higher than this.
    ``target_accuracy``: cheapest setting reaching this accuracy.
    ``max_accuracy_drop``: cheapest setting within this many accuracy points (0.01 = 1 point)
    of the best single pool model on these rows. With ``delta`` as well, the cheapest setting whose
    expected drop on unseen queries is at most ``max_accuracy_drop`` with probability ``1 - delta``
    (:func:`~difficulty_router.learning.risk_control.risk_controlled_point`; the rows must be new to the
    router): the point then carries ``upper_bound`` (the bound on the drop) and ``realised_drop``.

    Without labels, pass ``unlabelled`` prompts and one of ``strong_share`` (share of calls
    to the most capable model), ``shares`` (per model, zero-label ladder routers) or
    ``max_cost_per_1k``; see :func:`difficulty_router.routing.traffic.calibrate_unlabelled`.
    Sets ``router.policy`` and ``router.info["calibration"]``, and returns the chosen point.
    This is :meth:`DifficultyRouter.calibrate`.
    """
    if unlabelled is not None:
        if outcomes is not None or any(x is not None for x in (target_cost, target_accuracy, max_accuracy_drop, delta)):
            raise ValueError("give labelled outcomes with their targets, or unlabelled prompts with theirs, not both")
        return calibrate_unlabelled(
            router,
            unlabelled,
            strong_share=strong_share,
            shares=shares,
            max_cost_per_1k=max_cost_per_1k,
            progress=progress,
        )
    if outcomes is None:
        raise ValueError("calibrate needs labelled outcomes, or unlabelled= prompts with strong_share/max_cost_per_1k")
    given = [x is not None for x in (target_cost, target_accuracy, max_accuracy_drop)]
    if sum(given) != 1:
        raise ValueError("give exactly one of target_cost, target_accuracy or max_accuracy_drop")
    if delta is not None and max_accuracy_drop is None:
        raise ValueError("delta goes with max_accuracy_drop: the guarantee bounds the drop from the best model")
    outcomes = outcomes.select_models(router.models)
    if len(outcomes) < 10:
        raise ValueError(f"calibration needs at least 10 labelled rows, got {len(outcomes)}")
    if delta is not None:
        assert max_accuracy_drop is not None
        return _calibrate_with_guarantee(router, outcomes, max_accuracy_drop, delta, kind, proba, seed)
    points = router.operating_curve(outcomes, kind, proba)
    if max_accuracy_drop is not None:
        target_accuracy = float(outcomes.scores.mean(axis=0).max()) - max_accuracy_drop
    kind = kind or router.policy.kind
    point = pick_operating_point(
        points, Policy(kind).parameter, target_cost=target_cost, target_accuracy=target_accuracy
    )
    router.policy = Policy.from_point(kind, point)
    router.info["calibration"] = {
        "n": len(outcomes),
        "target_cost": target_cost,
        "target_accuracy": target_accuracy,
        "point": point,
    }
    if max_accuracy_drop is not None:
        router.info["calibration"]["realised_drop"] = float(outcomes.scores.mean(axis=0).max()) - point["accuracy"]
    return point


def _calibrate_with_guarantee(
    router: Any, outcomes: Outcomes, epsilon: float, delta: float, kind: str | None, proba, seed: int
) -> dict:
    """:func:`calibrate_router` with ``delta``: the risk-controlled point of the router's policy kind."""
    if proba is None:
        proba = router.predict_proba(outcomes.queries)
    costs = router.estimated_costs(outcomes)
    kind = kind or router.policy.kind
    risk = risk_controlled_point(
        Policy(kind, margin=router.utility_margin if kind == "utility" else 0.0),
        proba,
        outcomes.scores,
        costs,
        router.capability,
        realised_costs(outcomes, costs),
        router.eligibility(len(outcomes), None),
        epsilon=epsilon,
        delta=delta,
        seed=seed,
    )
    router.policy = risk.policy
    point = {risk.policy.parameter: risk.policy.value, "margin": risk.policy.margin, **risk.info()}
    router.info["calibration"] = {"n": len(outcomes), "max_accuracy_drop": epsilon, "delta": delta, "point": point}
    return point
