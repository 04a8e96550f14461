"""APGR / CPT and frontier metrics against hand-computed cases."""

import numpy as np
import pytest

from difficulty_router.core.metrics import apgr_cpt, curve_auc, frontier, pool_summary, strong_call_curve


def test_hand_computed_oracle_case():
    weak = np.array([1, 0, 0, 1])
    strong = np.array([1, 1, 1, 1])
    # oracle ranking: the two rows only the strong model gets right go first
    out = apgr_cpt(strong - weak, weak, strong)
    # PGR at fractions 0, .25, .5, .75, 1 = 0, .5, 1, 1, 1 -> trapezoid area 0.75
    assert out["apgr"] == pytest.approx(0.75)
    assert out["cpt50"] == pytest.approx(0.25)
    assert out["cpt80"] == pytest.approx(0.5)


def test_worst_ranking_case():
    weak = np.array([1, 0, 0, 1])
    strong = np.array([1, 1, 1, 1])
    out = apgr_cpt(-(strong - weak), weak, strong)
    # PGR = 0, 0, 0, .5, 1 -> area .25*(0 + 0 + .25 + .75) = 0.25
    assert out["apgr"] == pytest.approx(0.25)
    assert out["cpt50"] == pytest.approx(0.75)


def test_random_router_is_about_half():
    rng = np.random.default_rng(1)
    weak = rng.random(20000) < 0.68
    strong = rng.random(20000) < 0.81
    out = apgr_cpt(rng.random(20000), weak, strong)
    assert out["apgr"] == pytest.approx(0.5, abs=0.03)
    assert out["cpt50"] == pytest.approx(0.5, abs=0.05)


def test_oracle_router_reaches_full_gap_early():
    rng = np.random.default_rng(2)
    weak = rng.random(5000) < 0.68
    strong = rng.random(5000) < 0.81
    out = apgr_cpt(strong.astype(float) - weak, weak, strong)
    assert out["apgr"] > 1.0  # the oracle beats the strong model before calling it everywhere
    assert out["cpt50"] < 0.15


def test_curve_endpoints():
    frac, acc = strong_call_curve([0.3, 0.2, 0.1], [1, 0, 0], [0, 1, 1])
    assert frac.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert acc.tolist() == pytest.approx([1 / 3, 0, 1 / 3, 2 / 3])


def test_pgr_undefined_when_strong_not_better():
    with pytest.raises(ValueError, match="not more accurate"):
        apgr_cpt([0.1, 0.2], [1, 1], [1, 0])


def test_frontier_and_auc():
    points = [{"cost": 1, "accuracy": 0.5}, {"cost": 2, "accuracy": 0.4}, {"cost": 3, "accuracy": 0.8}]
    assert [p["cost"] for p in frontier(points)] == [1, 3]
    # budget 1..3: 0.5 until cost 3, then 0.8 at the end -> about 0.5
    assert curve_auc(points, 1, 3) == pytest.approx(0.5, abs=0.01)


def test_pool_summary_against_single_models():
    correct = np.array([[1, 1], [0, 1], [0, 0], [1, 0]], dtype=float)
    costs = np.array([1.0, 10.0])
    points = [{"cost": 1.0, "accuracy": 0.5}, {"cost": 3.25, "accuracy": 0.75}, {"cost": 10.0, "accuracy": 0.5}]
    out = pool_summary(points, correct, costs, ["a", "b"])
    assert out["best_model"] == "a"  # tie at 0.5: the cheaper one
    assert out["oracle_accuracy"] == pytest.approx(0.75)
    assert out["cost_to_match_best"] == pytest.approx(1.0)  # the cheapest point already matches model a
    assert out["oracle_gap_closed"] == pytest.approx(1.0)
