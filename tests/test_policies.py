"""Routing policies and operating-point calibration on hand-made probabilities."""

import numpy as np
import pytest

from difficulty_router.learning.policies import (
    Policy,
    complementary,
    dominated,
    fit_margin,
    pick_operating_point,
    sweep,
)

P = np.array([[0.9, 0.95, 0.97], [0.3, 0.7, 0.9], [0.1, 0.2, 0.4]])
COSTS = np.array([[1.0, 5.0, 20.0]] * 3)
CAPABILITY = np.array([0.5, 0.7, 0.9])


def test_threshold_picks_cheapest_above_tau_else_most_capable():
    chosen = Policy("threshold", 0.6).choose(P, COSTS, CAPABILITY)
    assert chosen.tolist() == [0, 1, 2]


def test_utility_trades_probability_against_cost():
    assert Policy("utility", 0.0).choose(P, COSTS, CAPABILITY).tolist() == [2, 2, 2]
    # lambda 0.5: utilities with costs normalised by 20 -> row 1: .275, .575, .4 -> model 1
    assert Policy("utility", 0.5).choose(P, COSTS, CAPABILITY).tolist() == [0, 1, 0]
    assert Policy("utility", 100.0).choose(P, COSTS, CAPABILITY).tolist() == [0, 0, 0]


def test_excluded_models_are_never_chosen():
    eligible = np.array([[False, True, True]] * 3)
    assert 0 not in Policy("threshold", 0.0).choose(P, COSTS, CAPABILITY, eligible)
    assert 0 not in Policy("utility", 100.0).choose(P, COSTS, CAPABILITY, eligible)
    with pytest.raises(ValueError, match="no eligible model"):
        Policy().choose(P, COSTS, CAPABILITY, np.zeros((3, 3), dtype=bool))


def test_bad_policies():
    with pytest.raises(ValueError, match="unknown policy"):
        Policy("greedy", 0.1)
    with pytest.raises(ValueError, match="tau must lie"):
        Policy("threshold", 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        Policy("utility", -1)


def test_operating_point_for_targets():
    correct = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=float)
    points = sweep(Policy("utility"), P, COSTS, CAPABILITY, correct)
    cheap = pick_operating_point(points, "lambda", target_cost=1.0)
    assert cheap["cost"] == pytest.approx(1.0) and cheap["accuracy"] == pytest.approx(1 / 3)
    accurate = pick_operating_point(points, "lambda", target_accuracy=1.0)
    # no lambda sends the rows to models (0, 1, 2) at once; the cheapest perfect setting is (0, 2, 2)
    assert accurate["accuracy"] == 1.0
    assert accurate["cost"] == pytest.approx((1 + 20 + 20) / 3)
    by_threshold = pick_operating_point(sweep(Policy("threshold"), P, COSTS, CAPABILITY, correct), "tau",
                                        target_accuracy=1.0)
    assert by_threshold["cost"] == pytest.approx((1 + 5 + 20) / 3)
    with pytest.raises(ValueError, match="no operating point costs"):
        pick_operating_point(points, "lambda", target_cost=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        pick_operating_point(points, "lambda")


def test_utility_margin_keeps_the_most_capable_model_unless_another_clearly_beats_it():
    # row 0: model 1 beats model 2 by 0.05 in P; row 1: by 0.3
    p = np.array([[0.2, 0.65, 0.6], [0.1, 0.9, 0.6]])
    costs = np.array([[1.0, 20.0, 20.0]] * 2)
    assert Policy("utility", 0.0).choose(p, costs, CAPABILITY).tolist() == [1, 1]
    assert Policy("utility", 0.0, margin=0.1).choose(p, costs, CAPABILITY).tolist() == [2, 1]
    assert Policy("utility", 0.0, margin=1.0).choose(p, costs, CAPABILITY).tolist() == [2, 2]
    # cost still wins when lambda is large: the margin is in utility units
    assert Policy("utility", 100.0, margin=1.0).choose(p, costs, CAPABILITY).tolist() == [0, 0]
    # the margin survives sweeps and serialisation
    assert {Policy("utility", 0.3, 0.2).with_value(0.5).margin, Policy.from_dict(Policy("utility", 0.3, 0.2).to_dict()).margin} == {0.2}
    with pytest.raises(ValueError, match="margin"):
        Policy("utility", 0.1, margin=2.0)


def test_fit_margin_needs_a_proven_gain_to_leave_the_best_model():
    rng = np.random.default_rng(0)
    n = 2000
    correct = np.column_stack([rng.random(n) < 0.5, rng.random(n) < 0.7]).astype(float)
    costs, capability = np.tile([1.0, 1.0], (n, 1)), correct.mean(axis=0)
    noise = rng.random((n, 2))  # probabilities that know nothing
    margin, table = fit_margin(noise, correct, costs, capability)
    assert margin == 1.0 and len(table) > 1
    assert (Policy("utility", 0.0, margin).choose(noise, costs, capability) == 1).all()
    informed = np.clip(correct + rng.normal(0, 0.2, correct.shape), 0, 1)  # knows which model is right
    margin, _ = fit_margin(informed, correct, costs, capability)
    assert margin < 1.0
    chosen = Policy("utility", 0.0, margin).choose(informed, costs, capability)
    assert correct[np.arange(n), chosen].mean() > correct[:, 1].mean() + 0.05


def test_dominated_models_are_found_and_pins_are_respected():
    names = ["cheap", "pricey-weak", "strong"]
    out = dominated([0.5, 0.45, 0.8], [1.0, 5.0, 10.0], names)
    assert list(out) == ["pricey-weak"] and "cheap" in out["pricey-weak"]
    assert dominated([0.5, 0.45, 0.8], [1.0, 5.0, 10.0], names, keep=("pricey-weak",)) == {}
    assert dominated([0.5, 0.5], [1.0, 1.0], ["a", "b"]) == {}  # a tie dominates nobody


def _complementary_pool(signal: bool, seed: int = 0):
    """Two models: "cheap" is right on 80% of rows, "dear" (4x the price) on 75%, so "dear" is dominated.
    With ``signal`` the rows where only "dear" is right (7.5%) are marked by feature 0 (a kind of query it
    is good at); without it they are random. Returns out-of-fold P(success) of a real probe, outcomes, costs."""
    from difficulty_router.learning.probes import SuccessProbe

    rng = np.random.default_rng(seed)
    n = 2000
    X = rng.standard_normal((n, 10))
    kind = X[:, 0] > 1.44 if signal else rng.random(n) < 0.075  # ~7.5% of rows
    cheap = np.where(kind, 0.0, (rng.random(n) < 0.865).astype(float))
    dear = np.where(kind, 1.0, (rng.random(n) < 0.73).astype(float))
    Y = np.column_stack([cheap, dear])
    probe = SuccessProbe(cv=5, seed=seed).fit(X, Y)
    costs = np.tile([1.0, 4.0], (n, 1))
    return probe.oof_proba_, Y, costs


def test_a_dominated_model_that_is_right_on_a_recognisable_kind_of_query_is_kept():
    proba, Y, costs = _complementary_pool(signal=True)
    capability = Y.mean(axis=0)
    names = ["cheap", "dear"]
    dropped = dominated(capability, costs.mean(axis=0), names)
    assert list(dropped) == ["dear"]
    kept = complementary(proba, Y, costs, capability, dropped, names)
    assert list(kept) == ["dear"] and "gains +" in kept["dear"]


def test_a_dominated_model_without_a_recognisable_niche_stays_dropped():
    """Same accuracies and the same disjoint successes, but nothing in the features marks them."""
    for seed in range(3):
        proba, Y, costs = _complementary_pool(signal=False, seed=seed)
        capability = Y.mean(axis=0)
        dropped = dominated(capability, costs.mean(axis=0), ["cheap", "dear"])
        assert complementary(proba, Y, costs, capability, dropped, ["cheap", "dear"]) == {}
