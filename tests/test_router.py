"""The router end to end on real parts: SmolLM2 features, probes trained on real RouteLLM MMLU rows."""

import copy
import json

import numpy as np
import pytest
from conftest import STRONG, WEAK, proba_atol
from sklearn.metrics import roc_auc_score

from difficulty_router import DifficultyRouter, ModelPool, Policy, RouteDecision
from difficulty_router.core.pool import PoolModel
from difficulty_router.evaluation.evaluate import evaluate_router, plot_report, report_table
from difficulty_router.learning.probes import SuccessProbe

HARD = "Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.\nA. 8\nB. 2\nC. 24\nD. 120\nAnswer:"
EASY = "What colour is the sky on a clear day?\nA. Blue\nB. Green\nC. Red\nD. Black\nAnswer:"


def test_route_returns_a_full_decision(trained_router):
    d = trained_router.route(EASY)
    assert isinstance(d, RouteDecision)
    assert d.model in (WEAK, STRONG)
    assert set(d.probabilities) == {WEAK, STRONG} and all(0 < p < 1 for p in d.probabilities.values())
    assert 1 <= d.difficulty <= 5 and d.difficulty_level in range(1, 6)
    assert d.expected_cost == d.costs[d.model] > 0
    assert d.policy == "utility" and d.parameter == "lambda"
    assert d.fallbacks == (() if d.model == STRONG else (STRONG,))
    json.dumps(d.to_dict())


@pytest.fixture(scope="module")
def held_out(trained_router, sample_outcomes):
    """Rows 240-479 (the router trained on rows 0-239) and the router's P(success) for them, extracted once
    for every test here that reads them."""
    held = sample_outcomes.subset(range(240, 480)).select_models(trained_router.models)
    return held, trained_router.predict_proba(held.queries)


def test_probabilities_track_held_out_success(trained_router, held_out):
    """Behaviour on rows the probes never saw: each model's P(success) ranks the rows it got right above the
    rows it got wrong, and its mean matches its held-out accuracy. Measured in float32: AUROC 0.69 (weak)
    and 0.77 (strong); mean P on right minus wrong rows 0.096 and 0.207; mean P 0.721 vs accuracy 0.721
    and 0.819 vs 0.833. Random, constant or swapped-column probabilities fail these."""
    held, proba = held_out
    for j, name in enumerate(trained_router.models):
        right = held.scores[:, held.models.index(name)] > 0.5
        assert right.sum() > 20 and (~right).sum() > 20
        assert roc_auc_score(right, proba[:, j]) > 0.62, name
        assert proba[right, j].mean() - proba[~right, j].mean() > 0.05, name
        assert abs(proba[:, j].mean() - right.mean()) < 0.05, name


def test_easy_query_scores_easier_than_hard_one(trained_router):
    """A sky-colour question against a permutation-group index: both models' P(success) are far higher for
    the easy one (measured 0.83/0.83 vs 0.38/0.17) and its difficulty is lower (1.7 vs 3.9 of 5)."""
    easy, hard = trained_router.route(EASY), trained_router.route(HARD)
    for m in (WEAK, STRONG):
        assert easy.probabilities[m] - hard.probabilities[m] > 0.25, m
    assert hard.difficulty - easy.difficulty > 1.0
    assert easy.difficulty_level < hard.difficulty_level


def _logit(p):
    return np.log(p / (1 - p))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


#: a three-model pool priced per call, cheapest = least capable
KNOWN_POOL = ModelPool((PoolModel("small", cost_per_query=1.0), PoolModel("medium", cost_per_query=3.0),
                        PoolModel("large", cost_per_query=10.0)))
KNOWN_EASY, KNOWN_HARD = np.array([0.9, 0.95, 0.97]), np.array([0.2, 0.5, 0.8])
PLATT_A, PLATT_C, SCALE = 2.0, -0.5, 2.0


@pytest.fixture(scope="module")
def known_router(extractor):
    """A router on the real extractor whose probe is set by hand: standardise by (x - x_hard) / 2, logit of
    model j = s_j * (u . z) + b_j with u . z = 1 at EASY and 0 at HARD, Platt (2, -0.5). So P(success) is
    KNOWN_EASY at EASY, KNOWN_HARD at HARD, and a closed form of the features anywhere else."""
    x_easy, x_hard = (readout(extractor, q) for q in (EASY, HARD))
    d = x_easy - x_hard
    u = SCALE * d / (d @ d)
    b = (_logit(KNOWN_HARD) - PLATT_C) / PLATT_A
    s = (_logit(KNOWN_EASY) - PLATT_C) / PLATT_A - b
    m = len(KNOWN_POOL)
    probe = SuccessProbe.from_arrays({
        "success.standardizer.mean": x_hard, "success.standardizer.scale": np.full_like(x_hard, SCALE),
        "success.coef": s[:, None] * u[None, :], "success.intercept": b,
        "success.platt": np.tile([PLATT_A, PLATT_C], (m, 1)), "success.C": np.ones(m), "success.cv_auroc": np.ones(m),
    })
    router = DifficultyRouter(extractor, KNOWN_POOL, probe, layers=[15], pooling=["last"],
                              capability=[0.6, 0.7, 0.8], policy=Policy("threshold", 0.5))
    return router, u, s, b, x_hard


def readout(extractor, query) -> np.ndarray:
    """One query's layer-15 last-token read-out, extracted alone as ``route`` extracts it."""
    return extractor.extract([query], layers=[15], pooling=["last"]).features[0].astype(np.float64)


def test_known_probe_gives_the_computed_probabilities(known_router, extractor):
    router, u, s, b, x_hard = known_router
    easy, hard = router.route(EASY), router.route(HARD)
    assert list(easy.probabilities.values()) == pytest.approx(KNOWN_EASY, abs=1e-6)
    assert list(hard.probabilities.values()) == pytest.approx(KNOWN_HARD, abs=1e-6)
    # without a difficulty probe, difficulty is 1 + 4 x the mean P(failure)
    assert easy.difficulty == pytest.approx(1 + 4 * (1 - KNOWN_EASY).mean(), abs=1e-5)  # 1.24
    assert hard.difficulty == pytest.approx(1 + 4 * (1 - KNOWN_HARD).mean(), abs=1e-5)  # 3.0
    # any other query: the closed form of its own features
    other = "What is 2 + 2?"
    z = (readout(extractor, other) - x_hard) / SCALE
    expected = _sigmoid(PLATT_A * (s * (u @ z) + b) + PLATT_C)
    assert list(router.route(other).probabilities.values()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("tau, easy_model, hard_model", [
    (0.0, "small", "small"),
    (0.4, "small", "medium"),   # hard: only medium (0.5) and large (0.8) clear 0.4; medium is cheaper
    (0.6, "small", "large"),
    (0.85, "small", "large"),   # hard: nobody clears 0.85, so the most capable model
    (0.93, "medium", "large"),  # easy: small (0.9) falls short, medium (0.95) is the cheapest above
    (0.96, "large", "large"),
    (1.0, "large", "large"),
])
def test_threshold_picks_the_cheapest_model_above_tau(known_router, tau, easy_model, hard_model):
    router, *_ = known_router
    router.policy = Policy("threshold", tau)
    easy, hard = router.route_batch([EASY, HARD])
    assert (easy.model, hard.model) == (easy_model, hard_model)
    order = ["small", "medium", "large"]
    for d in (easy, hard):
        assert d.expected_cost == d.costs[d.model] == KNOWN_POOL[d.model].cost_per_query
        assert d.fallbacks == tuple(order[order.index(d.model) + 1:])
        assert d.parameter == "tau" and d.parameter_value == tau


def test_threshold_skips_an_excluded_model(known_router):
    router, *_ = known_router
    router.policy = Policy("threshold", 0.6)
    d = router.route(EASY, exclude={"small": "no tools"})
    assert d.model == "medium" and d.skipped == {"small": "no tools"} and d.fallbacks == ("large",)


@pytest.mark.parametrize("lam, easy_model, hard_model", [
    # utility = P - lambda * cost / 10: easy (0.9, 0.95, 0.97), hard (0.2, 0.5, 0.8), costs (0.1, 0.3, 1)
    (0.0, "large", "large"),
    (0.1, "medium", "large"),  # easy 0.89 / 0.92 / 0.87; hard 0.19 / 0.47 / 0.70
    (0.5, "small", "medium"),  # easy 0.85 / 0.80 / 0.47; hard 0.15 / 0.35 / 0.30
    (2.0, "small", "small"),   # hard 0.00 / -0.10 / -1.20
])
def test_utility_picks_the_best_trade(known_router, lam, easy_model, hard_model):
    router, *_ = known_router
    router.policy = Policy("utility", lam)
    easy, hard = router.route_batch([EASY, HARD])
    assert (easy.model, hard.model) == (easy_model, hard_model)


QUERIES = [EASY, HARD, "What is 2 + 2?", "Name the capital of Italy.",
           "Prove that every finite integral domain is a field.",
           [{"role": "system", "content": "You are a tax lawyer."},
            {"role": "user", "content": "Does section 1031 cover a swap of shares in two private companies?"}],
           "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Mars\nD. Earth\nAnswer:",
           "Compute the determinant of the 3x3 matrix [[2, -1, 0], [-1, 2, -1], [0, -1, 2]] and explain each step."]


def decision_margin(decision) -> float:
    """How far a decision is from flipping, in probability units (what batch noise must exceed)."""
    p = np.array(list(decision.probabilities.values()))
    cost = np.array([decision.costs[m] for m in decision.probabilities])
    if decision.policy == "utility":
        utility = np.sort(p - decision.parameter_value * cost / cost.max())
        return float(utility[-1] - utility[-2])
    return float(np.abs(p - decision.parameter_value).min())


def router_in(extractor, trained_router):
    """The session router (probes trained on the pinned path's features) served by ``extractor``:
    what a router trained on one CPU kind does on another."""
    clone = copy.copy(trained_router)
    clone.extractor = extractor
    return clone


def test_route_batch_matches_route(any_dtype_extractor, trained_router):
    """The promise: probabilities agree within the dtype's tolerance, and a decision differs only
    for a query whose margin lies within it (bf16 batch noise cannot flip a clear decision)."""
    router = router_in(any_dtype_extractor, trained_router)
    tolerance = proba_atol(router)
    batch = router.route_batch(QUERIES)
    for query, batched in zip(QUERIES, batch):
        single = router.route(query)
        for m in single.probabilities:
            assert single.probabilities[m] == pytest.approx(batched.probabilities[m], abs=tolerance)
        if single.model != batched.model:
            assert decision_margin(single) <= 2 * tolerance, (query, single.probabilities, batched.probabilities)
    assert sum(router.route(q).model == d.model for q, d in zip(QUERIES, batch)) >= len(QUERIES) - 1


def test_policies_reach_both_models(trained_router):
    """At the extremes one model takes everything; in between the share moves monotonically and
    both models serve some of the same queries."""
    router = trained_router
    old = router.policy
    p_weak = router.predict_proba(QUERIES)[:, router.models.index(WEAK)]
    try:
        strong_share = []
        for tau in (0.0, *np.quantile(p_weak, [0.25, 0.5, 0.75]), 1.0):
            router.policy = Policy("threshold", float(tau))
            chosen = [d.model for d in router.route_batch(QUERIES)]
            strong_share.append(chosen.count(STRONG))
            # threshold rule: exactly the queries whose P(weak right) is below tau go to the strong model
            assert chosen == [STRONG if p < tau else WEAK for p in p_weak]
        assert strong_share[0] == 0 and strong_share[-1] == len(QUERIES)
        assert strong_share == sorted(strong_share) and 0 < strong_share[2] < len(QUERIES)
        weak_share = []
        for lam in (0.0, 0.01, 0.1, 1.0, 100.0):
            router.policy = Policy("utility", lam)
            weak_share.append([d.model for d in router.route_batch(QUERIES)].count(WEAK))
        assert weak_share == sorted(weak_share) and weak_share[-1] == len(QUERIES)
    finally:
        router.policy = old


def test_exclude_records_the_reason(trained_router):
    d = trained_router.route(EASY, exclude={STRONG: "cannot call tools"})
    assert d.model == WEAK and d.skipped == {STRONG: "cannot call tools"} and d.fallbacks == ()
    with pytest.raises(ValueError, match="every pool model is excluded"):
        trained_router.route(EASY, exclude={STRONG: "x", WEAK: "y"})
    with pytest.raises(ValueError, match="not in the pool"):
        trained_router.route(EASY, exclude={"gpt-5": "x"})


def test_training_records_its_choices(trained_router):
    info = trained_router.info
    assert info["readout"] == {"layers": [15], "pooling": ["last"]}
    assert set(info["cv_auroc"]) == {WEAK, STRONG}
    # real signal, not noise: 240 rows are few, but the probes must beat chance out of fold
    assert max(info["cv_auroc"].values()) > 0.55
    assert info["training"]["n"] == 240


def test_save_load_round_trip(trained_router, extractor, tmp_path):
    trained_router.save(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["manifest.json", "probes.safetensors"]
    loaded = DifficultyRouter.load(tmp_path / "r", extractor=extractor)
    queries = [EASY, HARD, [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}]]
    for a, b in zip(trained_router.route_batch(queries), loaded.route_batch(queries)):
        assert a.model == b.model and a.probabilities == b.probabilities and a.parameter_value == b.parameter_value


def test_load_builds_its_own_extractor(trained_router, tmp_path):
    trained_router.save(tmp_path / "r")
    loaded = DifficultyRouter.load(tmp_path / "r")
    assert loaded.extractor.model_hash == trained_router.extractor.model_hash
    assert loaded.route(HARD).probabilities == pytest.approx(trained_router.route(HARD).probabilities, abs=1e-6)


def test_tampered_or_mismatched_bundles_are_refused(trained_router, extractor, tmp_path):
    path = trained_router.save(tmp_path / "r")
    blob = bytearray((path / "probes.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "probes.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="altered"):
        DifficultyRouter.load(path, extractor=extractor)

    path = trained_router.save(tmp_path / "r2")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["extractor"]["model_hash"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="trained on extractor"):
        DifficultyRouter.load(path, extractor=extractor)

    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DifficultyRouter.load(path, extractor=extractor)
    with pytest.raises(FileNotFoundError, match="not a saved router"):
        DifficultyRouter.load(tmp_path / "nothing", extractor=extractor)


def test_calibrate_to_targets(trained_router, held_out):
    router = trained_router
    old = router.policy
    calib, proba = held_out[0].subset(range(120)), held_out[1][:120]  # rows 240-359
    try:
        strong_cost = router.estimated_costs(calib)[:, router.models.index(STRONG)].mean()
        point = router.calibrate(calib, target_cost=0.5 * strong_cost, proba=proba)
        assert point["cost"] <= 0.5 * strong_cost
        assert router.policy.value == point["lambda"]
        point = router.calibrate(calib, max_accuracy_drop=0.01, proba=proba)
        assert point["accuracy"] >= calib.scores.mean(axis=0).max() - 0.01
        with pytest.raises(ValueError, match="exactly one"):
            router.calibrate(calib, proba=proba)
    finally:
        router.policy = old


def test_evaluation_report_has_the_promised_keys(trained_router, sample_outcomes, tmp_path):
    test = sample_outcomes.subset(range(240, 360))
    report = evaluate_router(trained_router, test, train=sample_outcomes.subset(range(240)))
    for key in ("n", "auc", "baselines", "apgr", "cpt50", "cpt80", "best_model", "best_model_accuracy",
                "best_model_cost", "cost_to_match_best", "oracle_gap_closed", "curve"):
        assert key in report
    assert set(report["baselines"]) == {"random", "length", "tfidf", "knn", "oracle"}
    for base in report["baselines"].values():
        assert {"auc", "apgr", "cpt50", "cpt80", "cost_to_match_best", "oracle_gap_closed"} <= set(base)
    assert report["baselines"]["oracle"]["apgr"] > 1.0  # the oracle beats every real router
    assert report["best_model"] == STRONG
    # 95% bootstrap intervals for the router and each real baseline, and the router's paired margin
    intervals, margin = report["intervals"], report["margin"]
    assert intervals["metric"] == "apgr" and margin["baseline"] in ("length", "tfidf", "knn")
    for name in ("router", "length", "tfidf", "knn"):
        lo, hi = intervals[name]
        value = report["apgr"] if name == "router" else report["baselines"][name]["apgr"]
        assert lo < hi and lo - 0.02 <= value <= hi + 0.02
    lo, hi = margin["interval"]
    assert lo < margin["difference"] + 0.02 and margin["difference"] - 0.02 < hi
    table = report_table(report)
    assert "router (utility)" in table and f"best baseline ({margin['baseline']})" in table
    png = plot_report(report, tmp_path / "p.png")
    assert png.stat().st_size > 10_000
    json.dumps(report)


def test_most_accuracy_seeking_point_is_the_best_single_model(trained_router, held_out):
    """On real held-out rows the utility curve's accuracy-seeking end is exactly "always the best model",
    so matching the best model never costs more than it; and at value 0 with the trained margin the router
    leaves the best model only where training measured a gain (95% lower bound above zero)."""
    from difficulty_router.core.metrics import pool_summary

    router = trained_router
    held, proba = held_out  # rows 240-479
    best = int(np.argmax(router.capability))
    assert router.models[best] == STRONG
    curve = router.operating_curve(held, proba=proba)
    end = max(curve, key=lambda p: (p["accuracy"], -p["cost"]))
    assert end["accuracy"] >= held.scores[:, best].mean()
    assert any(p["share"][best] == len(held) and p["accuracy"] == pytest.approx(held.scores[:, best].mean())
               for p in curve)
    costs = router.estimated_costs(held).mean(axis=0)
    assert pool_summary(curve, held.scores, costs, router.models)["cost_to_match_best"] <= 1.0
    fitted = router.info["utility_margin"]
    assert router.utility_margin == fitted["margin"]
    at_zero = next(p for p in curve if p["lambda"] == 0.0 and p["margin"] == fitted["margin"])
    if fitted["margin"] == 1.0:
        assert at_zero["share"][best] == len(held)
    else:
        chosen = next(row for row in fitted["candidates"] if row["margin"] == fitted["margin"])
        assert chosen["gain_low95"] > 0
