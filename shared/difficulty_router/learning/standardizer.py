"""The input transform every probe starts with: z-scoring, then an optional PCA projection, kept as plain arrays.

It lives apart from the probes so that the helper that saves probes as named arrays
(:mod:`.probe_arrays`) and every learned part can share it without importing the probes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> Standardizer:
        self = cls()
        self.mean_ = arrays[f"{prefix}.mean"]
        self.scale_ = arrays[f"{prefix}.scale"]
        self.components_ = arrays.get(f"{prefix}.components")
        self.n_components = None if self.components_ is None else len(self.components_)
        return self
