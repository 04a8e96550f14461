"""Probes from activation features to per-model success and to difficulty.

Plain linear algebra on purpose: standardise, optional PCA, one L2 logistic regression
per model with its regularisation picked by cross-validated AUROC, then Platt scaling
fitted on out-of-fold scores so the probabilities are calibrated on rows the probe did
not see. Everything a fitted probe holds is a named float array, so a saved router is
plain safetensors + JSON and loading it executes nothing.

The pieces live beside it: the logistic fits and the Platt step in :mod:`.logistic`, the folds in
:mod:`.folds`, the input transform in :mod:`.standardizer`, the array layout in :mod:`.probe_arrays`,
the quick read-out scores in :mod:`.readout_scores`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from difficulty_router.learning.folds import nested_choice, shared_folds
from difficulty_router.learning.logistic import (
    _auroc,
    _check_xy,
    _fit_logistic,
    _logit,
    _sigmoid,
    apply_platt,
    is_lopsided,
    platt_scaling,
)
from difficulty_router.learning.probe_arrays import (
    CALIBRATED_FIELDS,
    LINEAR_FIELDS,
    part_arrays,
    set_part_arrays,
)
from difficulty_router.learning.standardizer import Standardizer

DEFAULT_CS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03)


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
        if is_lopsided(y, len(folds)):  # (almost) always right or wrong: a constant is honest
            constant = np.full(len(y), _logit(y.mean()))
            out["platt"][j] = platt_scaling(constant, y, len(folds))  # (0, logit(mean)): the base rate
            out["oof_logit"][:, j] = constant
            out["oof_proba"][:, j] = y.mean()
            for candidate in per_C:
                candidate[:, j] = constant
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
        out["platt"][j] = platt_scaling(oof, y, len(folds))
        out["oof_logit"][:, j] = oof
        out["oof_proba"][:, j] = _sigmoid(out["platt"][j, 0] * oof + out["platt"][j, 1])
        out["coef"][j], out["intercept"][j] = _fit_logistic(Z, y, C, seed)
    nested = nested_choice(per_C, Y, folds)
    out["nested_oof_logit"], out["nested_oof_proba"] = nested["logit"], nested["proba"]
    return out


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
        return apply_platt(self.platt_, self.decision_function(X))

    def arrays(self, prefix: str = "success") -> dict[str, np.ndarray]:
        return part_arrays(self, prefix, CALIBRATED_FIELDS)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "success") -> SuccessProbe:
        self = cls()
        set_part_arrays(self, arrays, prefix, CALIBRATED_FIELDS)
        m, _d = self.coef_.shape
        if self.intercept_.shape != (m,) or self.platt_.shape != (m, 2):
            raise ValueError("saved success probe arrays have inconsistent shapes")
        return self


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
        return part_arrays(self, prefix, LINEAR_FIELDS)

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "difficulty") -> DifficultyProbe:
        self = cls()
        set_part_arrays(self, arrays, prefix, LINEAR_FIELDS)
        return self
