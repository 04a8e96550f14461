"""Out-of-distribution escalation with the real extractor and the session's trained router.

The router was trained on 240 RouteLLM MMLU questions; queries of another kind entirely
(a hex dump, shell output) must score above the training read-outs and go to the most
capable model, while the training questions themselves must mostly stay below the threshold.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from difficulty_router import DifficultyRouter
from difficulty_router.learning.novelty import NoveltyScore, OODPolicy

ALIEN = [
    "0x7f454c46 0x02010100 0x00000000 0x00000000 0x03003e00 0x01000000 0x40100000 " * 8,
    "drwxr-xr-x 2 root root 4096 Nov 30 00:11 bin\n-rw-r--r-- 1 root root 220 Nov 30 .bashrc\n" * 10,
    "ZZZZ qqqq xxxx ZZZZ qqqq xxxx " * 30,
]


def with_ood(router, **policy):
    clone = copy.copy(router)
    clone.ood = OODPolicy(**{"enabled": True, **policy})
    return clone


def test_novel_queries_go_to_the_most_capable_model_and_the_decision_says_so(trained_router, sample_outcomes):
    assert trained_router.novelty is not None
    most_capable = trained_router.capability_order()[-1]
    router = with_ood(trained_router, percentile=99.0)
    alien = router.route_batch(ALIEN, progress=False)
    assert all(d.ood and d.model == most_capable for d in alien), [(d.novelty, d.model) for d in alien]
    assert all(d.novelty > 99.0 for d in alien)
    assert "out of distribution" in str(alien[0]) and alien[0].to_dict()["ood"] is True
    familiar = router.route_batch(sample_outcomes.queries[:60], progress=False)
    assert np.mean([d.ood for d in familiar]) <= 0.1  # training rows: in-sample, so rarely above the 99th percentile


def test_escalation_is_off_by_default_and_off_still_reports_the_score(trained_router):
    assert trained_router.ood == OODPolicy(enabled=False)
    router = with_ood(trained_router, enabled=False)
    cheapest = with_ood(trained_router, enabled=False)
    from difficulty_router import Policy

    cheapest.policy = Policy("threshold", 0.0)  # always the cheapest model, unless OOD escalation overrides
    decisions = cheapest.route_batch(ALIEN, progress=False)
    assert all(not d.ood and d.novelty > 99.0 for d in decisions)
    assert {d.model for d in decisions} == {trained_router.capability_order()[0]}
    escalating = with_ood(trained_router, percentile=99.0)
    escalating.policy = Policy("threshold", 0.0)
    assert {d.model for d in escalating.route_batch(ALIEN, progress=False)} == {trained_router.capability_order()[-1]}
    assert router.route(ALIEN[0]).novelty == pytest.approx(escalating.route(ALIEN[0]).novelty)


def test_the_novelty_score_and_policy_survive_save_and_load(trained_router, extractor, tmp_path):
    router = with_ood(trained_router, percentile=97.5)
    router.save(tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["novelty"] == {"enabled": True, "percentile": 97.5, "model": None}
    loaded = DifficultyRouter.load(tmp_path / "r", extractor)
    assert loaded.ood == router.ood
    assert loaded.route(ALIEN[0]).novelty == pytest.approx(router.route(ALIEN[0]).novelty, abs=1e-6)
    manifest["novelty"] = {"enabled": "yes"}
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="novelty.enabled"):
        DifficultyRouter.load(tmp_path / "r", extractor)


def test_the_percentile_is_calibrated_out_of_fold():
    """On fresh draws from the training distribution about 5% score above the 95th percentile;
    in-sample calibration would put far more there (high-dimensional distances shrink in-sample)."""
    rng = np.random.default_rng(0)
    cov = rng.normal(size=(64, 64)) / 8
    train = rng.normal(size=(400, 64)) @ cov
    fresh = rng.normal(size=(4000, 64)) @ cov
    novelty = NoveltyScore(n_components=16).fit(train)
    share = float((novelty.percentile(fresh) > 95).mean())
    assert 0.02 <= share <= 0.09, share
    shifted = fresh + 1.0 * train.std(0)  # one standard deviation along every feature
    assert float((novelty.percentile(shifted) > 95).mean()) > 0.5


def test_saved_novelty_arrays_are_checked():
    rng = np.random.default_rng(1)
    novelty = NoveltyScore(n_components=4).fit(rng.normal(size=(50, 8)))
    arrays = novelty.arrays()
    arrays["novelty.components"] = arrays["novelty.components"][:, :3]
    with pytest.raises(ValueError, match="inconsistent"):
        NoveltyScore.from_arrays(arrays)
    with pytest.raises(ValueError, match="percentile"):
        OODPolicy(percentile=0)
