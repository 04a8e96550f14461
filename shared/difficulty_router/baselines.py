"""Surface baselines in the same harness as the router: each predicts P(success) per model.

They go through the same policies and metrics as the activation probes, so the comparison
is of what each signal knows, not of how it is turned into a choice.
"""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from .data import Outcomes
from .queries import conversation_text

BASELINES = ("random", "length", "tfidf", "oracle")


def _texts(outcomes: Outcomes) -> list[str]:
    return [conversation_text(c) for c in outcomes.queries]


def _fit_predict(train_X, train_y, test_X, C):
    hard = (train_y >= 0.5).astype(int)
    if hard.min() == hard.max():
        return np.full(test_X.shape[0], train_y.mean())
    clf = LogisticRegression(C=C, max_iter=1000).fit(train_X, hard)
    return clf.predict_proba(test_X)[:, 1]


def _length_features(outcomes: Outcomes) -> np.ndarray:
    return np.log1p(np.array([[len(t)] for t in _texts(outcomes)], dtype=np.float64))


def _surface(kind: str, train: Outcomes, test: Outcomes) -> np.ndarray:
    if kind == "length":
        Xtr, Xte, C = _length_features(train), _length_features(test), 1.0
    else:
        vec = TfidfVectorizer(max_features=20000, ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        Xtr = vec.fit_transform(_texts(train))
        Xte, C = vec.transform(_texts(test)), 1.0
    return np.column_stack([_fit_predict(Xtr, train.scores[:, j], Xte, C) for j in range(len(train.models))])


def baseline_proba(kind: str, test: Outcomes, train: Outcomes | None = None, seed: int = 0, folds: int = 5) -> np.ndarray:
    """(n_test, n_models) P(success) of a baseline.

    ``length`` and ``tfidf`` are fitted on ``train`` when given, else cross-fitted on
    ``test`` itself (each row predicted by a model that did not see it).
    """
    if kind == "random":
        return np.random.default_rng(seed).random(test.scores.shape)
    if kind == "oracle":
        return test.scores.astype(np.float64)
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES}")
    if train is not None:
        return _surface(kind, train.select_models(test.models), test)
    out = np.zeros(test.scores.shape)
    hard = (test.scores[:, 0] >= 0.5).astype(int)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(test)), hard):
        out[te] = _surface(kind, test.subset(tr), test.subset(te))
    return out
