"""Pretraining the shared representation across corpora, and fine-tuning it on a new pool.

Synthetic on purpose: we decide whether the pretraining corpora carry the new pool's signal. Where they
do, a new pool with few labels must do better from the trunk than from scratch; where they miss a
direction the new pool needs, fine-tuning must find it instead of staying with the wrong trunk. The
real-corpus learning curves are ``benchmarks/pretrained_trunk.py``.
"""

import numpy as np
import pytest

from difficulty_router.learning.pretraining import pretrain_trunk, stack_corpora
from difficulty_router.learning.probes import _auroc
from difficulty_router.learning.shared_success import SharedSuccessModel


def corpus(X, direction, m, rng, spread=1.5):
    """0/1 outcomes of m models whose success rises along ``direction`` of the features."""
    theta = X @ direction
    offsets = np.linspace(-spread, spread, m)
    P = 1 / (1 + np.exp(-(theta[:, None] * rng.uniform(0.8, 1.2, m) + offsets)))
    return (rng.random(P.shape) < P).astype(float)


def held_out_auroc(model, X, Y):
    proba = model.predict_proba(X)
    return float(np.mean([_auroc(Y[:, j], proba[:, j]) for j in range(Y.shape[1])]))


def test_stacking_keeps_each_corpus_in_its_own_columns():
    a = (np.ones((3, 4)), np.array([[1, 0], [0, 1], [1, 1]], dtype=float))
    b = (np.zeros((2, 4)), np.array([0.5, 1.0]))
    X, Y = stack_corpora([a, b])
    assert X.shape == (5, 4) and Y.shape == (5, 3)
    np.testing.assert_array_equal(Y[:3, :2], a[1])
    np.testing.assert_array_equal(Y[3:, 2], [0.5, 1.0])
    assert np.isnan(Y[:3, 2]).all() and np.isnan(Y[3:, :2]).all()
    with pytest.raises(ValueError, match="same read-out width"):
        stack_corpora([a, (np.zeros((2, 5)), b[1])])
    with pytest.raises(ValueError, match="corpus 1: 2 feature rows but 3 label rows"):
        stack_corpora([a, (np.zeros((2, 4)), np.zeros(3))])
    with pytest.raises(ValueError, match="at least one corpus"):
        stack_corpora([])


def test_a_trunk_pretrained_on_other_corpora_needs_fewer_labels():
    """Two corpora with disjoint models and rows share one difficulty direction (plus a second direction
    in one of them). A third pool with 60 labels ranks held-out queries better from the pretrained trunk
    than from scratch, for every seed."""
    gains = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        d = 60
        basis = np.linalg.qr(rng.standard_normal((d, 2)))[0] * 2.5
        X1, X2, X3 = (rng.standard_normal((n, d)) for n in (1500, 1500, 2060))
        sources = [(X1, corpus(X1, basis[:, 0], 6, rng)), (X2, corpus(X2, basis[:, 0] + 0.5 * basis[:, 1], 4, rng))]
        pretrained = pretrain_trunk(sources, ranks=(1, 2), alphas=(0.01, 0.1), n_components=None, seed=seed)
        Y3 = corpus(X3, basis[:, 0], 5, rng)
        few, test = slice(0, 60), slice(60, None)
        started = SharedSuccessModel(trunk=pretrained.trunk(), fine_tune=True, seed=seed).fit(X3[few], Y3[few])
        scratch = SharedSuccessModel(seed=seed).fit(X3[few], Y3[few])
        gains.append(held_out_auroc(started, X3[test], Y3[test]) - held_out_auroc(scratch, X3[test], Y3[test]))
    assert min(gains) > 0.02, f"held-out AUROC gain from the pretrained trunk per seed: {gains}"


def test_fine_tuning_leaves_a_trunk_that_misses_the_new_pools_signal():
    """The trunk knows only a direction the new pool does not use. Held fixed it cannot rank the new pool's
    queries; with fine_tune=True cross-validation moves W to the new pool's direction and ranks them well."""
    rng = np.random.default_rng(7)
    d = 30
    X = rng.standard_normal((3000, d))
    old = corpus(X[:1500], 2.5 * np.eye(d)[0], 6, rng)
    source = SharedSuccessModel(ranks=(1,), n_components=None).fit(X[:1500], old)
    Y = corpus(X[1500:], 2.5 * np.eye(d)[1], 5, rng)  # the new pool's models depend on feature 1 only
    train, test = slice(0, 800), slice(800, None)
    frozen = SharedSuccessModel(trunk=source.trunk()).fit(X[1500:][train], Y[train])
    tuned = SharedSuccessModel(trunk=source.trunk(), fine_tune=True).fit(X[1500:][train], Y[train])
    assert frozen.mode_ == "frozen" and tuned.mode_ == "fine-tuned"
    auc_frozen = held_out_auroc(frozen, X[1500:][test], Y[test])
    auc_tuned = held_out_auroc(tuned, X[1500:][test], Y[test])
    assert auc_frozen < 0.6 < 0.75 < auc_tuned, (auc_frozen, auc_tuned)
    # fine-tuning moved W away from the trunk it started from
    assert not np.allclose(tuned.W_, source.W_)


def test_fine_tuning_needs_a_trunk():
    with pytest.raises(ValueError, match="needs a pretrained trunk"):
        SharedSuccessModel(fine_tune=True)
