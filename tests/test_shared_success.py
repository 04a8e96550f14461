"""The shared success model on synthetic pools whose answer is known.

Synthetic on purpose: here we decide where the signal lives (one shared ability axis, or a second
axis only one cheap model is good at), so a model that ignores that structure fails. The real-data
comparison is ``benchmarks/routing_pools.py``.
"""

import numpy as np
import pytest

from difficulty_router.learning.probes import SuccessProbe, _auroc, shared_folds
from difficulty_router.learning.shared_success import SharedSuccessModel


def synthetic_pool(n, d=60, m=8, rank=1, seed=0, noise_dims=None):
    """Features (n, d) and 0/1 outcomes (n, m): model j succeeds with sigmoid(a_j . theta(q) - b_j),
    theta = the first ``rank`` directions of a random projection of the features."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    directions = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    theta = X @ directions * 2.5
    slopes = np.abs(rng.normal(1.0, 0.2, (m, rank)))
    offsets = np.linspace(-1.5, 1.5, m)
    P = 1 / (1 + np.exp(-(theta @ slopes.T + offsets)))
    return X, (rng.random(P.shape) < P).astype(float), P


def held_out_auroc(model, X, Y):
    proba = model.predict_proba(X)
    return float(np.mean([_auroc(Y[:, j], proba[:, j]) for j in range(Y.shape[1])])), proba


def test_shared_structure_needs_fewer_labels_than_one_probe_per_model():
    """Eight models share one ability axis. With 150 labelled rows each per-model probe estimates the
    axis alone from its own noisy labels; the shared model pools all eight, so it ranks held-out queries
    better for every seed, and a stronger model less often gets the lower P(success)."""
    gains, inversions = [], []
    for seed in range(3):
        X, Y, P = synthetic_pool(2150, seed=seed)
        train, test = slice(0, 150), slice(150, None)
        folds = shared_folds(Y[train], 5, seed)
        probe = SuccessProbe(cv=5, seed=seed).fit(X[train], Y[train], folds=folds)
        shared = SharedSuccessModel(cv=5, seed=seed).fit(X[train], Y[train], folds=folds)
        auc_probe, p_probe = held_out_auroc(probe, X[test], Y[test])
        auc_shared, p_shared = held_out_auroc(shared, X[test], Y[test])
        gains.append(auc_shared - auc_probe)
        # models are ordered weakest to strongest by construction (offsets rise)
        inversions.append(
            (np.mean(np.diff(p_shared, axis=1) < 0), np.mean(np.diff(p_probe, axis=1) < 0))
        )
        assert shared.rank_ <= 2, f"one shared axis was read as rank {shared.rank_}"
    assert min(gains) > 0.02, f"held-out AUROC gain of the shared model per seed: {gains}"
    assert all(s < p for s, p in inversions), f"inversions (shared, per-model) per seed: {inversions}"


def test_a_complementary_model_keeps_its_own_direction():
    """Two abilities: seven models need the first, one cheap specialist only the second. The shared model
    must choose rank >= 2 and rank the specialist's queries as well as its own probe does."""
    rng = np.random.default_rng(5)
    n, d = 3000, 40
    X = rng.standard_normal((n, d))
    general, special = X[:, 0] * 2.0, X[:, 1] * 2.5
    P = np.column_stack([1 / (1 + np.exp(-(general + b))) for b in np.linspace(-1, 1.5, 7)]
                        + [1 / (1 + np.exp(-special))])
    Y = (rng.random(P.shape) < P).astype(float)
    train, test = slice(0, 1000), slice(1000, None)
    shared = SharedSuccessModel(cv=5).fit(X[train], Y[train])
    probe = SuccessProbe(cv=5).fit(X[train], Y[train])
    assert shared.rank_ >= 2
    specialist_shared = _auroc(Y[test, 7], shared.predict_proba(X[test])[:, 7])
    specialist_probe = _auroc(Y[test, 7], probe.predict_proba(X[test])[:, 7])
    assert specialist_shared > 0.8 and specialist_shared >= specialist_probe - 0.01
    # the specialist's P(success) does not follow the general ability: nearly uncorrelated
    proba = shared.predict_proba(X[test])
    assert abs(np.corrcoef(proba[:, 7], general[test])[0, 1]) < 0.2


def test_a_pretrained_trunk_fits_only_the_heads_and_transfers():
    """A trunk fitted on other models' labels (disjoint rows) starts a new pool: with 60 labels the heads on
    the frozen trunk beat a shared model fitted from scratch on the same 60 rows."""
    X, Y, _ = synthetic_pool(4060, m=12, seed=3)
    source = SharedSuccessModel(cv=5).fit(X[:2000, :], Y[:2000, :8])  # models 0-7 pretrain
    new = slice(2000, 2060)
    tuned = SharedSuccessModel(cv=5, trunk=source.trunk()).fit(X[new], Y[new, 8:])
    scratch = SharedSuccessModel(cv=5).fit(X[new], Y[new, 8:])
    np.testing.assert_array_equal(tuned.W_, source.W_)
    auc_tuned, _ = held_out_auroc(tuned, X[2060:], Y[2060:, 8:])
    auc_scratch, _ = held_out_auroc(scratch, X[2060:], Y[2060:, 8:])
    assert auc_tuned > auc_scratch + 0.03, (auc_tuned, auc_scratch)


def test_missing_labels_train_the_shared_part():
    X, Y, _ = synthetic_pool(600, m=4, seed=1)
    holes = Y.copy()
    holes[::3, 0] = np.nan  # model 0 has no record for a third of the rows
    model = SharedSuccessModel(cv=3, ranks=(1,), alphas=(0.1,)).fit(X, holes)
    assert np.isfinite(model.oof_proba_).all() and np.isfinite(model.cv_auroc_).all()
    with pytest.raises(ValueError, match=r"column\(s\) \[1\] have no labels"):
        bad = Y.copy()
        bad[:, 1] = np.nan
        SharedSuccessModel(cv=3).fit(X, bad)
    with pytest.raises(ValueError, match="labels must be numbers in"):
        SharedSuccessModel(cv=3).fit(X, Y * 2)


def test_saved_arrays_reload_to_the_same_predictions():
    X, Y, _ = synthetic_pool(300, m=3, seed=2)
    model = SharedSuccessModel(cv=3, ranks=(2,), alphas=(0.1,)).fit(X, Y)
    again = SharedSuccessModel.from_arrays(model.arrays("shared"), "shared")
    np.testing.assert_allclose(again.predict_proba(X[:20]), model.predict_proba(X[:20]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="features have 5 columns"):
        model.predict_proba(X[:2, :5])
    broken = model.arrays("shared")
    broken["shared.heads"] = broken["shared.heads"][:, :1]
    with pytest.raises(ValueError, match="inconsistent shapes"):
        SharedSuccessModel.from_arrays(broken, "shared")
