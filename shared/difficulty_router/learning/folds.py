"""Cross-validation folds shared by every model and family, and choices made without the predicted fold.

Out-of-fold predictions of different families are stackable and comparable only when they come
from the same folds (:func:`shared_folds`); a hyperparameter picked on all rows flatters the rows it
is then reported on, so the predictions that compare families choose it on the other folds
(:func:`nested_choice`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from difficulty_router.learning.logistic import _auroc, _platt, _sigmoid


def shared_folds(Y: np.ndarray, cv: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """One set of CV folds for every model and every feature family.

    Stratified on which models get the row right (small pools) or how many do (larger
    ones), so each fold sees the pool's spread of difficulty; using the same folds everywhere is what makes out-of-fold
    predictions of different families stackable and comparable.
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    hard = (Y >= 0.5).astype(int)
    correct = hard @ (1 << np.arange(hard.shape[1])) if hard.shape[1] <= 4 else hard.sum(axis=1)
    # adjacent counts too rare to appear in every fold are merged, lowest first
    strata, group, size = np.zeros(len(Y), dtype=int), 0, 0
    for value, count in zip(*np.unique(correct, return_counts=True), strict=False):
        strata[correct == value] = group
        size += count
        if size >= cv:
            group, size = group + 1, 0
    if size and group:  # a small remainder joins the group below it
        strata[strata == group] = group - 1
    if strata.max() == 0:
        return list(KFold(cv, shuffle=True, random_state=seed).split(Y))
    return list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(np.zeros(len(Y)), strata))


def nested_choice(candidates: Sequence[np.ndarray], Y: np.ndarray, folds, per_column: bool = True) -> dict:
    """Out-of-fold predictions whose hyperparameter choice and calibration never saw the predicted fold.

    Why: the usual out-of-fold predictions take, per model, the candidate (C, n-gram kind, rank...)
    with the best out-of-fold AUROC on all rows, rows included whose predictions are then reported.
    Choosing the best of a dozen candidates on the same rows rewards noise: tf-idf on random words
    reached a mean AUROC of 0.54 that way, and out-of-fold family comparison and margin fitting took
    it for signal. Here, for each fold, the candidate is chosen (per column, or by the mean over
    columns) on the other folds' rows and its logit Platt-scaled on them too; the fold's rows only
    receive the result. ``candidates``: out-of-fold logits (n, m), one array per candidate, on
    ``folds``. NaN labels are unobserved and ignored. Returns ``logit`` and ``proba`` (n, m).
    """
    Y = np.asarray(Y, dtype=np.float64)
    observed = np.isfinite(Y)
    n, m = Y.shape
    logit, proba = np.zeros((n, m)), np.zeros((n, m))

    def score(c: np.ndarray, rows: np.ndarray, j: int) -> float:
        seen = rows[observed[rows, j]]
        return _auroc(Y[seen, j], c[seen, j]) if len(seen) else float("nan")

    for train, test in folds:
        train, test = np.asarray(train), np.asarray(test)
        table = np.array([[score(c, train, j) for j in range(m)] for c in candidates])  # (candidates, m)
        filled = np.where(np.isfinite(table), table, 0.5)
        chosen = np.argmax(filled, axis=0) if per_column else np.full(m, int(np.argmax(filled.mean(axis=1))))
        for j in range(m):
            c = candidates[chosen[j]]
            seen = train[observed[train, j]]
            y = Y[seen, j]
            logit[test, j] = c[test, j]
            if len(seen) == 0:
                proba[test, j] = 0.5
            elif np.bincount((y >= 0.5).astype(int), minlength=2).min() < 2:  # (almost) constant: say so
                proba[test, j] = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
            else:
                a, b = _platt(c[seen, j], y)
                proba[test, j] = _sigmoid(a * c[test, j] + b)
    return {"logit": logit, "proba": proba}
