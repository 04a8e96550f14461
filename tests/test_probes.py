"""Success probes: fit, calibration, persistence as arrays, validation."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from difficulty_router.learning.probes import DifficultyProbe, SuccessProbe, derived_difficulty


def synthetic(n=600, d=20, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    logits = np.stack([2 * X[:, 0] + 1.0, 2 * X[:, 0] - 1.0 + X[:, 1]], axis=1)
    Y = (rng.random((n, 2)) < 1 / (1 + np.exp(-logits))).astype(float)
    return X, Y


def test_probe_learns_and_is_calibrated():
    X, Y = synthetic()
    Xt, Yt = synthetic(seed=1)
    probe = SuccessProbe(cv=3).fit(X, Y)
    P = probe.predict_proba(Xt)
    assert P.shape == (600, 2)
    for j in range(2):
        assert roc_auc_score(Yt[:, j], P[:, j]) > 0.75
        assert abs(P[:, j].mean() - Yt[:, j].mean()) < 0.05  # calibrated on average
    assert (probe.cv_auroc_ > 0.75).all()


def test_constant_outcome_gives_constant_probability():
    X, Y = synthetic()
    Y[:, 1] = 1.0
    P = SuccessProbe(cv=3).fit(X, Y).predict_proba(X)
    assert np.allclose(P[:, 1], P[0, 1]) and P[0, 1] > 0.99


def test_soft_scores_are_accepted():
    X, Y = synthetic()
    soft = np.clip(Y * 0.8 + 0.1, 0, 1)
    P = SuccessProbe(cv=3).fit(X, soft).predict_proba(X)
    assert roc_auc_score(Y[:, 0], P[:, 0]) > 0.75


def test_round_trip_through_arrays():
    X, Y = synthetic()
    probe = SuccessProbe(cv=3, n_components=8).fit(X, Y)
    again = SuccessProbe.from_arrays(probe.arrays())
    assert np.allclose(again.predict_proba(X), probe.predict_proba(X))


def test_bad_inputs():
    X, Y = synthetic()
    with pytest.raises(ValueError, match="NaN"):
        SuccessProbe().fit(np.where(X > 2, np.nan, X), Y)
    with pytest.raises(ValueError, match="label rows"):
        SuccessProbe().fit(X, Y[:10])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        SuccessProbe().fit(X, Y * 2)
    probe = SuccessProbe(cv=3).fit(X, Y)
    with pytest.raises(ValueError, match="fitted on 20"):
        probe.predict_proba(X[:, :5])


def test_difficulty():
    assert derived_difficulty(np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])).tolist() == [1.0, 5.0, 3.0]
    X, _ = synthetic()
    levels = np.clip(np.rint(3 + 1.5 * X[:, 0]), 1, 5)
    pred = DifficultyProbe().fit(X, levels).predict(X)
    assert np.corrcoef(pred, levels)[0, 1] > 0.9
    with pytest.raises(ValueError, match="1-5"):
        DifficultyProbe().fit(X, levels + 10)
