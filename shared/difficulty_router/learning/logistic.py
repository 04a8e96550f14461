"""The logistic pieces every probe is made of: soft-label L2 logistic regression, Platt scaling and AUROC.

The activation probes, the lexical probe, the stack, the shared success model and the streamed
shard training all fit a score per model and then turn it into a calibrated probability the same
way; that step lives here once (:func:`platt_scaling`), so the families stay comparable and a fix
to it reaches every one of them.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(np.log(p / (1 - p)))


def _check_xy(X, Y=None):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"features must be a non-empty 2-D array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinite values")
    if Y is None:
        return X
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"{X.shape[0]} feature rows but {Y.shape[0]} label rows")
    if not np.isfinite(Y).all() or (Y < 0).any() or (Y > 1).any():
        raise ValueError("labels must be finite numbers in [0, 1]")
    return X, Y


def _fit_logistic(Z, y, C, seed):
    """L2 logistic regression on soft labels: each row counts y times as 1 and 1-y times as 0.

    ``Z`` may be dense or scipy-sparse (the lexical read-out is sparse).
    """
    soft = not np.isin(y, (0.0, 1.0)).all()
    clf = LogisticRegression(C=C, max_iter=500, random_state=seed)
    if soft:
        stacked = sparse.vstack([Z, Z]).tocsr() if sparse.issparse(Z) else np.vstack([Z, Z])
        clf.fit(stacked, np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=np.r_[y, 1 - y])
    else:
        clf.fit(Z, y.astype(int))
    return clf.coef_[0], float(clf.intercept_[0])


def _auroc(y, score) -> float:
    hard = (y >= 0.5).astype(int)
    if hard.min() == hard.max():
        return float("nan")
    return float(roc_auc_score(hard, score))


def _platt(score, y) -> tuple[float, float]:
    clf = LogisticRegression(C=1e4, max_iter=1000)
    soft = not np.isin(y, (0.0, 1.0)).all()
    s = score[:, None]
    if soft:
        clf.fit(np.vstack([s, s]), np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=np.r_[y, 1 - y])
    else:
        clf.fit(s, y.astype(int))
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


def is_lopsided(y: np.ndarray, min_per_class: int) -> bool:
    """True when fewer than ``min_per_class`` rows of ``y`` (soft labels, cut at 0.5) fall in one class."""
    return bool(np.bincount((np.asarray(y) >= 0.5).astype(int), minlength=2).min() < min_per_class)


def platt_scaling(scores: np.ndarray, y: np.ndarray, min_per_class: int = 1) -> tuple[float, float]:
    """One model's Platt step: ``(a, b)`` with P(success) = sigmoid(a * score + b), fitted on held-out
    ``scores`` and their labels ``y``.

    A model (almost) always right or wrong, fewer than ``min_per_class`` rows in one class, gets the
    constant ``(0, logit(mean))`` instead: its base rate is the honest probability. The probes pass
    their fold count (every fold must see both classes); the streamed shard training passes 1.
    """
    if is_lopsided(y, min_per_class):
        return 0.0, _logit(float(np.mean(y)))
    return _platt(scores, y)


def apply_platt(platt: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Calibrated probabilities from raw logits (n, m) and per-model Platt pairs (m, 2)."""
    return _sigmoid(platt[:, 0] * logits + platt[:, 1])
