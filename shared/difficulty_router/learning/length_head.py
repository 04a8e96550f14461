"""A read-out head predicting each pool model's output length, so the utility policy prices in dollars.

Real bills charge output tokens, and output length varies by model and by query (on MMLU-Pro the
same question draws answers ten times longer from one model than another). The head is a ridge
regression per model from the router's read-out to log output tokens; ``predict_tokens`` turns
that back into expected tokens with Duan's smearing factor (the mean of exp(residual) on the
training rows), since exp(E[log t]) underestimates E[t]. Trained from recorded lengths: MMLU-Pro's
``output_chars`` (4 characters a token) via :func:`fit_length_head`, or any (queries, tokens) table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from difficulty_router.learning.logistic import _check_xy
from difficulty_router.learning.probe_arrays import part_arrays, set_part_arrays
from difficulty_router.learning.standardizer import Standardizer

CHARS_PER_TOKEN = 4.0
#: What the head saves beside its input transform: ridge weights and intercepts per model, and the
#: smearing factors that undo the log scale's bias.
LENGTH_FIELDS = ("coef", "intercept", "smearing")


class OutputLengthHead:
    """Ridge per model: read-out -> log(output tokens). Rows without a record (NaN or <= 0) are skipped."""

    def __init__(self, alphas=(1.0, 10.0, 100.0, 1000.0, 10000.0)) -> None:
        self.alphas = alphas

    def fit(self, X, tokens) -> OutputLengthHead:
        from sklearn.linear_model import RidgeCV

        X = _check_xy(X)
        T = np.asarray(tokens, dtype=np.float64)
        if T.ndim != 2 or T.shape[0] != X.shape[0]:
            raise ValueError(f"tokens must be (n_rows, n_models) for {X.shape[0]} feature rows, got shape {T.shape}")
        if np.isinf(T).any() or (T < 0).any():
            raise ValueError("output tokens must be >= 0 and finite (NaN marks a row without a record)")
        self.standardizer_ = Standardizer().fit(X)
        Z = self.standardizer_.transform(X)
        m = T.shape[1]
        self.coef_ = np.zeros((m, Z.shape[1]))
        self.intercept_ = np.zeros(m)
        self.smearing_ = np.ones(m)
        for j in range(m):
            valid = np.isfinite(T[:, j]) & (T[:, j] > 0)
            if valid.sum() < 10:
                raise ValueError(f"model column {j} has {int(valid.sum())} recorded lengths; the head needs >= 10")
            y = np.log(T[valid, j])
            ridge = RidgeCV(alphas=self.alphas).fit(Z[valid], y)
            self.coef_[j], self.intercept_[j] = ridge.coef_, ridge.intercept_
            residual = y - ridge.predict(Z[valid])
            self.smearing_[j] = float(np.mean(np.exp(residual)))
        return self

    def predict_log(self, X) -> np.ndarray:
        """(n, m) predicted log output tokens."""
        Z = self.standardizer_.transform(_check_xy(X))
        return Z @ self.coef_.T + self.intercept_[None, :]

    def predict_tokens(self, X) -> np.ndarray:
        """(n, m) expected output tokens (smeared back from the log scale)."""
        return np.exp(self.predict_log(X)) * self.smearing_[None, :]

    def arrays(self, prefix: str = "length") -> dict[str, np.ndarray]:
        return part_arrays(self, prefix, LENGTH_FIELDS)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "length") -> OutputLengthHead:
        self = cls()
        set_part_arrays(self, arrays, prefix, LENGTH_FIELDS)
        if self.coef_.ndim != 2 or self.intercept_.shape != (self.coef_.shape[0],):
            raise ValueError("the length head's arrays are inconsistent")
        return self


def output_tokens_from_chars(output_chars: Any) -> np.ndarray:
    """Recorded answer lengths in characters -> tokens (4 characters a token); 0 (no record) -> NaN."""
    chars = np.asarray(output_chars, dtype=np.float64)
    return np.where(chars > 0, chars / CHARS_PER_TOKEN, np.nan)


def fit_length_head(router: Any, outcomes: Any, features: np.ndarray | None = None) -> OutputLengthHead:
    """Fit a length head for ``router`` from outcomes carrying ``extra["output_chars"]`` (MMLU-Pro) and
    attach it: the router's decisions then price each model with its predicted output tokens."""
    chars = outcomes.extra.get("output_chars") if hasattr(outcomes, "extra") else None
    if chars is None:
        raise ValueError("these outcomes carry no output lengths (extra['output_chars']); load MMLU-Pro with them")
    missing = [m for m in router.models if m not in outcomes.models]
    if missing:
        raise ValueError(f"the outcomes have no lengths for the pool model(s) {missing}")
    columns = [list(outcomes.models).index(m) for m in router.models]  # extra keeps the loader's column order
    tokens = output_tokens_from_chars(np.asarray(outcomes.extra["output_chars"], dtype=np.float64)[:, columns])
    if features is None:
        features = router.features(outcomes.queries).features
    router.length_head = OutputLengthHead().fit(features, tokens)
    return router.length_head
