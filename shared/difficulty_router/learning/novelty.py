"""Out-of-distribution detection on the read-out: is this query unlike anything the probes were fitted on?

The success probes are linear in the read-out; on a query far from the training read-outs
they extrapolate, and their probabilities are as confident as anywhere else. A cheap guard is
a novelty score: the Mahalanobis distance of the read-out to the training read-outs under a
probabilistic-PCA covariance (z-scored features, the top ``k`` principal directions with their
own variances, one shared variance for the rest). That costs one (d x k) projection per
query. The score is calibrated as a percentile of *out-of-fold* training scores (each fold
scored by a model fitted without it), because in-sample distances of high-dimensional points
are optimistically small. Queries above the chosen percentile go to the most capable model
(:class:`OODPolicy`), and the decision says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILE_GRID = np.linspace(0.0, 100.0, 1001)


class NoveltyScore:
    """Fit on training read-outs (n, d); ``percentile(X)`` places new read-outs among the training ones (0-100)."""

    def __init__(self, n_components: int = 32, folds: int = 5, seed: int = 0) -> None:
        self.n_components, self.folds, self.seed = n_components, folds, seed

    @staticmethod
    def _fit_parts(X: np.ndarray, k: int) -> dict[str, np.ndarray]:
        mean, scale = X.mean(0), X.std(0) + 1e-6
        Z = (X - mean) / scale
        _, s, vt = np.linalg.svd(Z, full_matrices=False)
        k = max(1, min(k, len(s) - 1, Z.shape[1] - 1))
        eig = s**2 / max(len(Z) - 1, 1)
        rest = eig[k:]
        # the discarded directions share one variance; floor it so a rank-deficient training set stays finite
        residual_var = max(float(rest.sum() / max(Z.shape[1] - k, 1)), 1e-6 * float(eig[0]))
        return {
            "mean": mean,
            "scale": scale,
            "components": vt[:k],
            "variances": np.maximum(eig[:k], 1e-12),
            "residual_var": np.array([residual_var]),
        }

    @staticmethod
    def _score(parts: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float64) - parts["mean"]) / parts["scale"]
        P = Z @ parts["components"].T
        residual = (Z * Z).sum(1) - (P * P).sum(1)
        d = Z.shape[1]
        return ((P * P / parts["variances"]).sum(1) + np.maximum(residual, 0) / parts["residual_var"][0]) / d

    def fit(self, X) -> NoveltyScore:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 2 * self.folds or not np.isfinite(X).all():
            raise ValueError(
                f"novelty needs a finite 2-D array of at least {2 * self.folds} read-outs, got shape {X.shape}"
            )
        order = np.random.default_rng(self.seed).permutation(len(X))
        oof = np.empty(len(X))
        for fold in np.array_split(order, self.folds):
            train = np.setdiff1d(order, fold)
            oof[fold] = self._score(self._fit_parts(X[train], self.n_components), X[fold])
        self.parts_ = self._fit_parts(X, self.n_components)
        self.quantiles_ = np.percentile(oof, QUANTILE_GRID)
        return self

    def score(self, X) -> np.ndarray:
        """Mean squared Mahalanobis distance per feature (about 1 for a typical training read-out)."""
        return self._score(self.parts_, np.atleast_2d(X))

    def percentile(self, X) -> np.ndarray:
        """Where each read-out's score falls among the out-of-fold training scores, 0-100."""
        return np.interp(self.score(X), self.quantiles_, QUANTILE_GRID, left=0.0, right=100.0)

    def arrays(self, prefix: str = "novelty") -> dict[str, np.ndarray]:
        out = {f"{prefix}.{k}": v for k, v in self.parts_.items()}
        out[f"{prefix}.quantiles"] = self.quantiles_
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "novelty") -> NoveltyScore:
        self = cls()
        self.parts_ = {
            k: np.asarray(arrays[f"{prefix}.{k}"], dtype=np.float64)
            for k in ("mean", "scale", "components", "variances", "residual_var")
        }
        self.quantiles_ = np.asarray(arrays[f"{prefix}.quantiles"], dtype=np.float64)
        d = self.parts_["mean"].shape
        k = self.parts_["variances"].shape
        if (
            len(d) != 1
            or self.parts_["scale"].shape != d
            or self.parts_["components"].shape != k + d
            or self.parts_["residual_var"].shape != (1,)
            or self.quantiles_.shape != QUANTILE_GRID.shape
            or np.any(np.diff(self.quantiles_) < 0)
            or not all(np.isfinite(v).all() for v in self.parts_.values())
        ):
            raise ValueError("saved novelty arrays have inconsistent shapes or values")
        self.n_components = k[0]
        return self


@dataclass(frozen=True)
class OODPolicy:
    """What to do with novel queries: above ``percentile`` of the training scores, send the query to
    ``model`` (None: the most capable eligible model). Off by default (it changes what existing routers
    choose, and on our measured category shift it bought accuracy at several times the cost, see the
    pools results page, docs/results/pools.md); when off, decisions still report the score."""

    enabled: bool = False
    percentile: float = 99.0
    model: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"novelty.enabled must be true or false, got {self.enabled!r}")
        if (
            isinstance(self.percentile, bool)
            or not isinstance(self.percentile, (int, float))
            or not 0 < self.percentile <= 100
        ):
            raise ValueError(f"novelty.percentile must be a number in (0, 100], got {self.percentile!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"novelty.model must be a model name or null, got {self.model!r}")

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "percentile": float(self.percentile), "model": self.model}

    @classmethod
    def from_dict(cls, data) -> OODPolicy:
        if data is None:
            return cls()
        unknown = set(data) - {"enabled", "percentile", "model"}
        if unknown:
            raise ValueError(f"novelty has unknown fields {sorted(unknown)}")
        return cls(**data)
