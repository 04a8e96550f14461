"""How well a read-out (a layer and pooling) predicts success, quickly: what the read-out sweep compares.

A quick probe per model (one C, a few stratified folds, rows subsampled) scores each candidate
read-out; the same row subset and bootstrap resamples for every candidate make the comparison paired.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold

from difficulty_router.learning.logistic import _auroc, _check_xy, _fit_logistic, is_lopsided
from difficulty_router.learning.standardizer import Standardizer


def readout_oof(
    X, Y, cv: int = 3, C: float = 0.01, seed: int = 0, max_rows: int = 3000
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold scores of a quick probe per model, and the models' hard labels (rows subsampled to
    ``max_rows`` with ``seed``, so every read-out of the same rows is scored on the same subset: paired).
    Models too lopsided for ``cv`` folds are left out."""
    X, Y = _check_xy(X, Y)
    if len(X) > max_rows:
        keep = np.random.default_rng(seed).choice(len(X), max_rows, replace=False)
        X, Y = X[keep], Y[keep]
    Z = Standardizer().fit(X).transform(X)
    scores, labels = [], []
    for j in range(Y.shape[1]):
        y = Y[:, j]
        hard = (y >= 0.5).astype(int)
        if is_lopsided(y, cv):
            continue
        oof = np.zeros(len(y))
        for train, test in StratifiedKFold(cv, shuffle=True, random_state=seed).split(Z, hard):
            w, b = _fit_logistic(Z[train], y[train], C, seed)
            oof[test] = Z[test] @ w + b
        scores.append(oof)
        labels.append(hard)
    if not scores:
        return np.zeros((len(X), 0)), np.zeros((len(X), 0), dtype=int)
    return np.stack(scores, axis=1), np.stack(labels, axis=1)


def readout_score(X, Y, cv: int = 3, C: float = 0.01, seed: int = 0, max_rows: int = 3000) -> float:
    """Mean cross-validated AUROC over models of a quick probe: how well a read-out predicts success."""
    oof, hard = readout_oof(X, Y, cv, C, seed, max_rows)
    aucs = [_auroc(hard[:, j], oof[:, j]) for j in range(hard.shape[1])]
    return float(np.mean(aucs)) if aucs else float("nan")


def bootstrap_mean_auroc(oof: np.ndarray, hard: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """Mean-over-models AUROC on each bootstrap resample of rows (``resamples``: B x n row indexes).

    Mann-Whitney from average ranks, vectorised over resamples; the same ``resamples`` for two
    read-outs give paired differences. A resample where a model's labels are all one class is NaN.
    """
    from scipy.stats import rankdata

    out = np.zeros(len(resamples))
    for j in range(hard.shape[1]):
        y = hard[resamples, j]
        ranks = rankdata(oof[resamples, j], axis=1)
        pos = y.sum(axis=1)
        neg = y.shape[1] - pos
        with np.errstate(invalid="ignore", divide="ignore"):
            out += ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)
    return out / max(hard.shape[1], 1)
