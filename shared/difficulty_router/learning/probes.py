"""Probes from activation features to per-model success and to difficulty.

Plain linear algebra on purpose: standardise, optional PCA, one L2 logistic regression
per model with its regularisation picked by cross-validated AUROC, then Platt scaling
fitted on out-of-fold scores so the probabilities are calibrated on rows the probe did
not see. Everything a fitted probe holds is a named float array, so a saved router is
plain safetensors + JSON and loading it executes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold
from tqdm.auto import tqdm

DEFAULT_CS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03)


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


def fit_calibrated_columns(
    Z, Y: np.ndarray, folds, Cs, seed: int = 0, progress: bool = False, desc: str = "probes"
) -> dict:
    """One L2 logistic regression per column of ``Y``, C by out-of-fold AUROC, Platt-scaled on out-of-fold scores.

    Returns plain arrays: ``coef`` (m, d), ``intercept``, ``platt`` (m, 2), ``C``, ``cv_auroc``,
    the out-of-fold ``oof_logit`` (before Platt) and ``oof_proba`` (after) at the chosen C, and
    ``nested_oof_logit``/``nested_oof_proba`` (:func:`nested_choice`: C and Platt chosen without
    the predicted fold) that stacking, family selection and margin fitting read.
    """
    m, d = Y.shape[1], Z.shape[1]
    out = {
        "coef": np.zeros((m, d)),
        "intercept": np.zeros(m),
        "platt": np.zeros((m, 2)),
        "C": np.zeros(m),
        "cv_auroc": np.full(m, np.nan),
        "oof_logit": np.zeros(Y.shape),
        "oof_proba": np.zeros(Y.shape),
    }
    per_C = [np.zeros(Y.shape) for _ in Cs]  # every candidate's out-of-fold logits, for nested_choice
    for j in tqdm(range(m), disable=not progress, desc=desc, unit="model"):
        y = Y[:, j]
        hard = (y >= 0.5).astype(int)
        if np.bincount(hard, minlength=2).min() < len(folds):  # (almost) always right or wrong: a constant is honest
            out["platt"][j] = (0.0, _logit(y.mean()))
            out["oof_logit"][:, j] = _logit(y.mean())
            out["oof_proba"][:, j] = y.mean()
            for candidate in per_C:
                candidate[:, j] = _logit(y.mean())
            continue
        best: tuple[float, Any, Any] = (-np.inf, None, None)
        for k, C in enumerate(Cs):
            oof = np.zeros(len(y))
            for train, test in folds:
                if np.ptp(hard[train]) == 0:
                    oof[test] = _logit(y[train].mean())
                    continue
                w, b = _fit_logistic(Z[train], y[train], C, seed)
                oof[test] = Z[test] @ w + b
            per_C[k][:, j] = oof
            auc = _auroc(y, oof)
            if auc > best[0] + 1e-4:
                best = (auc, C, oof)
        auc, C, oof = best
        out["C"][j], out["cv_auroc"][j] = C, auc
        out["platt"][j] = _platt(oof, y)
        out["oof_logit"][:, j] = oof
        out["oof_proba"][:, j] = _sigmoid(out["platt"][j, 0] * oof + out["platt"][j, 1])
        out["coef"][j], out["intercept"][j] = _fit_logistic(Z, y, C, seed)
    nested = nested_choice(per_C, Y, folds)
    out["nested_oof_logit"], out["nested_oof_proba"] = nested["logit"], nested["proba"]
    return out


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


class Standardizer:
    """z-scoring followed by an optional PCA projection, stored as plain arrays."""

    def __init__(self, n_components: int | None = None) -> None:
        self.n_components = n_components

    def fit(self, X: np.ndarray) -> Standardizer:
        self.mean_ = X.mean(0)
        self.scale_ = X.std(0) + 1e-6
        Z = (X - self.mean_) / self.scale_
        if self.n_components and self.n_components < min(Z.shape):
            _, _, vt = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
            self.components_: np.ndarray | None = vt[: self.n_components]
        else:
            self.components_ = None
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.scale_
        return Z @ self.components_.T if self.components_ is not None else Z

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.mean": self.mean_, f"{prefix}.scale": self.scale_}
        if self.components_ is not None:
            out[f"{prefix}.components"] = self.components_
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> Standardizer:
        self = cls()
        self.mean_ = arrays[f"{prefix}.mean"]
        self.scale_ = arrays[f"{prefix}.scale"]
        self.components_ = arrays.get(f"{prefix}.components")
        self.n_components = None if self.components_ is None else len(self.components_)
        return self


class SuccessProbe:
    """P(model m answers the query well) for each of m models, from activation features.

    ``fit(X, Y)`` takes features (n, d) and outcomes (n, m) in [0, 1] (soft scores are
    fine); ``predict_proba(X)`` returns calibrated probabilities (n, m).
    """

    def __init__(self, Cs=DEFAULT_CS, cv: int = 5, n_components: int | None = None, seed: int = 0) -> None:
        if cv < 2:
            raise ValueError(f"cv must be at least 2, got {cv}")
        self.Cs = tuple(Cs)
        self.cv = cv
        self.n_components = n_components
        self.seed = seed

    def fit(self, X, Y, progress: bool = False, names: list[str] | None = None, folds=None) -> SuccessProbe:
        """``folds`` (train, test) index pairs; default :func:`shared_folds` of ``Y``."""
        X, Y = _check_xy(X, Y)
        if len(X) < 2 * self.cv:
            raise ValueError(f"need at least {2 * self.cv} labelled rows to fit with {self.cv}-fold CV, got {len(X)}")
        self.standardizer_ = Standardizer(self.n_components).fit(X)
        Z = self.standardizer_.transform(X)
        fitted = fit_calibrated_columns(
            Z, Y, folds or shared_folds(Y, self.cv, self.seed), self.Cs, self.seed, progress
        )
        self.coef_, self.intercept_, self.platt_ = fitted["coef"], fitted["intercept"], fitted["platt"]
        self.C_, self.cv_auroc_ = fitted["C"], fitted["cv_auroc"]
        self.oof_logit_, self.oof_proba_ = fitted["oof_logit"], fitted["oof_proba"]
        self.nested_oof_logit_, self.nested_oof_proba_ = fitted["nested_oof_logit"], fitted["nested_oof_proba"]
        self.names_ = list(names) if names is not None else [str(j) for j in range(Y.shape[1])]
        return self

    def decision_function(self, X) -> np.ndarray:
        Z = self.standardizer_.transform(_check_xy(X))
        if Z.shape[1] != self.coef_.shape[1]:
            raise ValueError(
                f"features have {X.shape[1]} columns; the probe was fitted on {self.standardizer_.mean_.shape[0]}"
            )
        return Z @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        X = _check_xy(X)
        if X.shape[1] != self.standardizer_.mean_.shape[0]:
            raise ValueError(
                f"features have {X.shape[1]} columns; the probe was fitted on {self.standardizer_.mean_.shape[0]}"
            )
        return _sigmoid(self.platt_[:, 0] * self.decision_function(X) + self.platt_[:, 1])

    def arrays(self, prefix: str = "success") -> dict[str, np.ndarray]:
        return {**self.standardizer_.arrays(f"{prefix}.standardizer"), **calibrated_arrays(self, prefix)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "success") -> SuccessProbe:
        self = cls()
        self.standardizer_ = Standardizer.from_arrays(arrays, f"{prefix}.standardizer")
        set_calibrated_arrays(self, arrays, prefix)
        m, _d = self.coef_.shape
        if self.intercept_.shape != (m,) or self.platt_.shape != (m, 2):
            raise ValueError("saved success probe arrays have inconsistent shapes")
        return self


#: What a calibrated linear probe saves besides its input transform: weights, intercepts, Platt
#: scaling, the chosen regularisation and the cross-validated AUROC (one row or entry per model).
CALIBRATED_FIELDS = ("coef", "intercept", "platt", "C", "cv_auroc")


def calibrated_arrays(probe: Any, prefix: str) -> dict[str, np.ndarray]:
    """The probe's ``coef_``/``intercept_``/``platt_``/``C_``/``cv_auroc_`` as ``{prefix}.{field}`` arrays."""
    return {f"{prefix}.{name}": getattr(probe, f"{name}_") for name in CALIBRATED_FIELDS}


def set_calibrated_arrays(probe: Any, arrays: dict[str, np.ndarray], prefix: str) -> None:
    """The inverse of ``calibrated_arrays``; a missing array raises KeyError naming it."""
    for name in CALIBRATED_FIELDS:
        setattr(probe, f"{name}_", arrays[f"{prefix}.{name}"])


def derived_difficulty(proba: np.ndarray) -> np.ndarray:
    """1-5 from the expected share of pool models that fail: 1 = all succeed, 5 = all fail."""
    return 1.0 + 4.0 * (1.0 - np.asarray(proba)).mean(axis=1)


class DifficultyProbe:
    """Ordinal 1-5 difficulty by ridge regression on features, for data that carries labels."""

    def __init__(self, alphas=(1.0, 10.0, 100.0, 1000.0, 10000.0)) -> None:
        self.alphas = alphas

    def fit(self, X, levels) -> DifficultyProbe:
        from sklearn.linear_model import RidgeCV

        X = _check_xy(X)
        levels = np.asarray(levels, dtype=np.float64)
        if not np.isin(levels, (1, 2, 3, 4, 5)).all():
            raise ValueError("difficulty labels must be integers 1-5")
        self.standardizer_ = Standardizer().fit(X)
        ridge = RidgeCV(alphas=self.alphas).fit(self.standardizer_.transform(X), levels)
        self.coef_, self.intercept_ = ridge.coef_, np.array([ridge.intercept_])
        return self

    def predict(self, X) -> np.ndarray:
        Z = self.standardizer_.transform(_check_xy(X))
        return np.clip(Z @ self.coef_ + self.intercept_[0], 1.0, 5.0)

    def arrays(self, prefix: str = "difficulty") -> dict[str, np.ndarray]:
        out = self.standardizer_.arrays(f"{prefix}.standardizer")
        out.update({f"{prefix}.coef": self.coef_, f"{prefix}.intercept": self.intercept_})
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "difficulty") -> DifficultyProbe:
        self = cls()
        self.standardizer_ = Standardizer.from_arrays(arrays, f"{prefix}.standardizer")
        self.coef_, self.intercept_ = arrays[f"{prefix}.coef"], arrays[f"{prefix}.intercept"]
        return self


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
        if np.bincount(hard, minlength=2).min() < cv:
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
