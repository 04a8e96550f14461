"""The risk-controlled operating point (issue 29, item 4): Learn-then-Test with a betting test.

The guarantee is checked on synthetic pools whose true drop at every setting is known (computed from the
generating probabilities on a large reference sample): over many independent data sets the chosen
setting's true drop exceeds epsilon in at most about delta of them, while the point-estimate rule
(cheapest setting within epsilon on the same rows) exceeds it far more often, so the check can fail.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from difficulty_router.learning.policies import Policy, pick_operating_point, sweep
from difficulty_router.learning.risk_control import ALWAYS_BEST, drop_test, risk_controlled_point
from difficulty_router.training.operating_point import default_operating_point

COSTS = np.array([0.1, 1.0])  # a cheap weak model and a dear strong one


def pool(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(true success probabilities (n, 2), the predictor's probabilities): the strong model's advantage
    varies from row to row, so raising lambda hands rows to the weak model one by one and the drop grows
    smoothly. The predictor sees the truth through noise."""
    weak = rng.uniform(0.2, 0.9, n)
    gain = rng.uniform(0.0, 0.3, n)
    truth = np.c_[weak, np.clip(weak + gain, 0, 1)]
    return truth, np.clip(truth + rng.normal(0, 0.05, truth.shape), 0.001, 0.999)


def draw(n: int, rng: np.random.Generator):
    truth, proba = pool(n, rng)
    scores = (rng.random(truth.shape) < truth).astype(np.float64)
    return proba, scores, np.tile(COSTS, (n, 1))


def test_chosen_point_keeps_the_true_drop_within_epsilon_in_all_but_about_delta_of_data_sets():
    rng = np.random.default_rng(7)
    epsilon, delta, n, repeats = 0.02, 0.1, 1000, 60
    truth, proba = pool(100_000, rng)  # the reference population: the true drop of any setting
    capability = truth.mean(axis=0)
    costs = np.tile(COSTS, (len(truth), 1))
    rows = np.arange(len(truth))

    def true_drop(policy: Policy) -> float:
        return float(truth[:, 1].mean() - truth[rows, policy.choose(proba, costs, capability)].mean())

    guaranteed, estimated, cheaper = [], [], 0
    for r in range(repeats):
        p, scores, c = draw(n, rng)
        point = risk_controlled_point(Policy("utility"), p, scores, c, capability, epsilon=epsilon, delta=delta, seed=r)
        guaranteed.append(true_drop(point.policy))
        cheaper += not point.fallback
        naive = pick_operating_point(
            sweep(Policy("utility"), p, c, capability, scores), "lambda",
            target_accuracy=scores[:, 1].mean() - epsilon,
        )  # fmt: skip
        estimated.append(true_drop(Policy("utility", naive["lambda"], naive.get("margin", 0.0))))
    guaranteed_violations = np.mean(np.array(guaranteed) > epsilon)
    estimated_violations = np.mean(np.array(estimated) > epsilon)
    assert guaranteed_violations <= delta + 0.05  # at most about delta (binomial slack over 60 data sets)
    assert estimated_violations >= 0.3  # the point estimate breaks it often: the check has teeth
    assert cheaper >= repeats // 2  # and the guarantee is not bought by never leaving the best model


def test_a_looser_epsilon_buys_a_cheaper_point():
    proba, scores, costs = draw(4000, np.random.default_rng(1))
    capability = scores.mean(axis=0)
    tight = risk_controlled_point(Policy("utility"), proba, scores, costs, capability, epsilon=0.02)
    loose = risk_controlled_point(Policy("utility"), proba, scores, costs, capability, epsilon=0.05)
    assert not tight.fallback and loose.cost < tight.cost
    for point in (tight, loose):
        assert point.upper_bound <= point.epsilon and point.realised_drop <= point.upper_bound
        assert point.n == 4000 and point.tested >= 1
    threshold = risk_controlled_point(Policy("threshold"), proba, scores, costs, capability, epsilon=0.05)
    assert threshold.policy.kind == "threshold" and threshold.cost < threshold.best_cost


def test_too_few_rows_fall_back_to_the_best_model():
    proba, scores, costs = draw(60, np.random.default_rng(2))
    point = risk_controlled_point(Policy("utility"), proba, scores, costs, scores.mean(axis=0))
    assert point.fallback and point.policy == ALWAYS_BEST
    assert point.upper_bound == 0.0 and point.realised_drop == 0.0 and point.cost == pytest.approx(1.0)
    assert point.info()["cost_share_of_best"] == pytest.approx(1.0)


def test_the_betting_bound_is_sharp_where_rows_agree():
    agree = np.zeros(2000)
    agree[:40], agree[40:80] = 1, -1  # 4% of rows disagree, evenly: mean 0
    reject, bound = drop_test(agree, 0.01, 0.1)
    assert reject and 0 < bound < 0.01
    reject, bound = drop_test(np.r_[np.ones(100), np.zeros(1900)], 0.01, 0.1)  # a true drop of 5 points
    assert not reject and bound > 0.05


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"epsilon": "0.01"}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"delta": True}, "delta"),
    ],
)
def test_bad_levels_are_refused_by_name(kwargs, match):
    proba, scores, costs = draw(50, np.random.default_rng(3))
    with pytest.raises(ValueError, match=match):
        risk_controlled_point(Policy("utility"), proba, scores, costs, scores.mean(axis=0), **kwargs)


def test_bad_shapes_are_refused_by_name():
    proba, scores, costs = draw(50, np.random.default_rng(4))
    capability = scores.mean(axis=0)
    with pytest.raises(ValueError, match="scores must have proba's shape"):
        risk_controlled_point(Policy(), proba, scores[:40], costs, capability)
    with pytest.raises(ValueError, match="proba must be a non-empty"):
        risk_controlled_point(Policy(), proba[:, 0], scores, costs, capability)
    with pytest.raises(ValueError, match="costs must have"):
        risk_controlled_point(Policy(), proba, scores, costs[:, :1], capability)
    with pytest.raises(ValueError, match="capability"):
        risk_controlled_point(Policy(), proba, scores, costs, capability[:1])
    with pytest.raises(ValueError, match=r"scores must be finite and lie in \[0, 1\]"):
        risk_controlled_point(Policy(), proba, 2 * scores, costs, capability)


def test_training_records_the_bound_and_can_make_it_the_policy(trained_router, sample_outcomes):
    """The session router (240 real rows) records the risk-controlled point; with ``guarantee`` the same
    out-of-fold predictions make it the policy, and ``calibrate`` with ``delta`` reports it."""
    info = trained_router.info["risk_controlled_operating_point"]
    assert info["epsilon"] == 0.01 and info["delta"] == 0.1 and info["n"] == 240
    assert {"upper_bound", "realised_drop", "cost", "cost_share_of_best", "policy", "fallback"} <= set(info)
    assert info["fallback"] or info["upper_bound"] <= 0.01
    train = sample_outcomes.subset(range(240))
    oof = trained_router.family_fit_.oof[trained_router.family]
    costs = trained_router.estimated_costs(train)
    point = default_operating_point(
        trained_router, oof, train.scores, costs, costs, max_accuracy_drop=0.05, guarantee=True, delta=0.2
    )
    risk = point.risk_controlled
    assert risk is not None and point.policy == risk.policy
    recorded = point.info()["default_operating_point"]
    assert recorded["rule"].startswith("risk-controlled") and recorded["upper_bound"] == risk.upper_bound
    router, before = copy.copy(trained_router), trained_router.info.get("calibration")
    router.info = dict(trained_router.info)
    calibrated = router.calibrate(train, max_accuracy_drop=0.05, delta=0.2, proba=oof)
    assert router.policy.to_dict() == calibrated["policy"]
    assert {"upper_bound", "realised_drop", "epsilon", "delta", "n"} <= set(calibrated)
    assert router.info["calibration"]["delta"] == 0.2 and trained_router.info.get("calibration") is before
    with pytest.raises(ValueError, match="delta goes with max_accuracy_drop"):
        router.calibrate(train, target_cost=0.001, delta=0.1, proba=oof)
