"""Baselines in the same harness as the router: each predicts P(success) per model.

They go through the same policies and metrics as the router, so the comparison is of what
each signal knows, not of how it is turned into a choice. Each is tuned by cross-validation
on its training rows with the same care as the router: TF-IDF picks analyzer, n-gram range
and C (it is the router's own lexical probe), kNN picks k, length is one feature.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from difficulty_router.data.outcomes import Outcomes
from difficulty_router.data.queries import conversation_text
from difficulty_router.learning.families import length_feature, mean_auroc
from difficulty_router.learning.lexical import LexicalProbe
from difficulty_router.learning.probes import Standardizer, shared_folds

BASELINES = ("random", "length", "tfidf", "knn", "oracle")
NEEDS_FEATURES = ("knn",)
KNN_KS = (10, 25, 50, 100)


def _texts(outcomes: Outcomes) -> list[str]:
    return [conversation_text(c) for c in outcomes.queries]


def _length(train: Outcomes, test: Outcomes) -> np.ndarray:
    Xtr, Xte = length_feature(_texts(train)), length_feature(_texts(test))
    out = np.zeros(test.scores.shape)
    for j in range(len(train.models)):
        hard = (train.scores[:, j] >= 0.5).astype(int)
        if hard.min() == hard.max():
            out[:, j] = train.scores[:, j].mean()
        else:
            out[:, j] = LogisticRegression(max_iter=1000).fit(Xtr, hard).predict_proba(Xte)[:, 1]
    return out


def _unit_rows(X: np.ndarray, standardizer: Standardizer) -> np.ndarray:
    Z = standardizer.transform(np.asarray(X, dtype=np.float64))
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def _knn_vote(Ztr: np.ndarray, Ytr: np.ndarray, Zte: np.ndarray, k: int) -> np.ndarray:
    """Mean outcome of the k most cosine-similar training rows, shrunk toward the base rate (one pseudo-row)."""
    k = min(k, len(Ztr))
    sims = Zte @ Ztr.T
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return (Ytr[nearest].sum(axis=1) + Ytr.mean(axis=0)) / (k + 1)


def knn_proba(
    train_features: np.ndarray, train_scores: np.ndarray, test_features: np.ndarray, cv: int = 5, seed: int = 0
) -> tuple[np.ndarray, int]:
    """kNN vote over the activation read-out, k chosen by cross-validated mean AUROC; returns (proba, k)."""
    standardizer = Standardizer().fit(np.asarray(train_features, dtype=np.float64))
    Ztr, Zte = _unit_rows(train_features, standardizer), _unit_rows(test_features, standardizer)
    Y = np.asarray(train_scores, dtype=np.float64)
    folds = shared_folds(Y, cv, seed)
    best = (-np.inf, KNN_KS[0])
    for k in KNN_KS:
        if k >= len(Ztr) * (cv - 1) / cv:
            break
        oof = np.zeros(Y.shape)
        for tr, te in folds:
            oof[te] = _knn_vote(Ztr[tr], Y[tr], Ztr[te], k)
        score = np.nan_to_num(mean_auroc(oof, Y), nan=0.5)
        if score > best[0] + 1e-4:
            best = (score, k)
    return _knn_vote(Ztr, Y, Zte, best[1]), best[1]


def _fit_on(kind: str, train: Outcomes, test: Outcomes, seed: int, train_features, test_features) -> np.ndarray:
    if kind == "length":
        return _length(train, test)
    if kind == "knn":
        return knn_proba(train_features, train.scores, test_features, seed=seed)[0]
    probe = LexicalProbe(seed=seed).fit(_texts(train), train.scores)
    return probe.predict_proba(_texts(test))


def baseline_proba(
    kind: str,
    test: Outcomes,
    train: Outcomes | None = None,
    seed: int = 0,
    folds: int = 5,
    train_features: np.ndarray | None = None,
    test_features: np.ndarray | None = None,
) -> np.ndarray:
    """(n_test, n_models) P(success) of a baseline.

    ``length``, ``tfidf`` and ``knn`` are fitted on ``train`` when given, else cross-fitted
    on ``test`` itself (each row predicted by a model that did not see it). ``knn`` reads
    activation features: ``test_features`` (and ``train_features`` with ``train``).
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES}")
    if kind == "random":
        return np.random.default_rng(seed).random(test.scores.shape)
    if kind == "oracle":
        return test.scores.astype(np.float64)
    if kind in NEEDS_FEATURES and (test_features is None or (train is not None and train_features is None)):
        raise ValueError(
            f"the {kind!r} baseline reads activation features; pass test_features"
            + (" and train_features" if train is not None else "")
        )
    if train is not None:
        return _fit_on(kind, train.select_models(test.models), test, seed, train_features, test_features)
    out = np.zeros(test.scores.shape)
    hard = (test.scores[:, 0] >= 0.5).astype(int)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(test)), hard):
        feats = (None, None) if test_features is None else (test_features[tr], test_features[te])
        out[te] = _fit_on(kind, test.subset(tr), test.subset(te), seed, *feats)
    return out
