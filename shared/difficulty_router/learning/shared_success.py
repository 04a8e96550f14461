"""One success model for the whole pool: a shared query representation with small per-model heads.

Per-model probes fit every model's weights alone, each on a few hundred noisy labels, so in a pool
of seven models the same "this question is hard" direction is estimated seven times, badly, and a
stronger model can come out with the lower P(success) (an inversion). Most of what decides which
model answers a query is shared: one or a few latent abilities the query demands (multidimensional
item response theory). Here

    theta(q) = W^T z(q)                      (k shared dimensions; z is the standardised read-out)
    P(model m answers q) = sigmoid(a_m . theta(q) + b_m)

so the pool's coefficient matrix W A^T has rank k: every model's labels inform W, and a model adds
only k + 1 numbers. Rank 1 is "one difficulty axis, one slope per model"; higher ranks carry what
makes a cheaper model right where a stronger one is wrong (complementarity). Rank and penalty are
chosen by cross-validated AUROC on the caller's folds, and each model gets Platt scaling on its
out-of-fold logits, as :class:`~difficulty_router.learning.probes.SuccessProbe` does, so the two are
interchangeable and compared on equal terms.

Labels may be missing (NaN): a corpus where not every model answered every question still trains
the shared part, which is what pretraining the representation across corpora needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize

from difficulty_router.learning.folds import nested_choice, shared_folds
from difficulty_router.learning.logistic import _auroc, _check_xy, _sigmoid, apply_platt, is_lopsided, platt_scaling
from difficulty_router.learning.probe_arrays import part_arrays, set_part_arrays
from difficulty_router.learning.standardizer import Standardizer

DEFAULT_RANKS = (1, 2, 4, 8)
DEFAULT_ALPHAS = (0.01, 0.03, 0.1, 0.3)
#: What the model saves beside its input transform: the shared trunk W, the per-model heads, their
#: intercepts, Platt pairs and cross-validated AUROC. ``heads`` is held as ``coef_heads_`` (``coef_``
#: is the rank-k product).
SHARED_FIELDS = ("W", "heads", "intercept", "platt", "cv_auroc")
_SHARED_ATTRIBUTES = {"heads": "coef_heads_"}


def _check_labels(X: np.ndarray, Y) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, m) in [0, 1] with NaN for "no record"; returns (Y with NaN as 0, observed mask)."""
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"{X.shape[0]} feature rows but {Y.shape[0]} label rows")
    observed = np.isfinite(Y)
    if np.isinf(Y).any() or (Y[observed] < 0).any() or (Y[observed] > 1).any():
        raise ValueError("labels must be numbers in [0, 1] (NaN for a model with no record)")
    empty = np.flatnonzero(observed.sum(axis=0) == 0)
    if len(empty):
        raise ValueError(f"model column(s) {empty.tolist()} have no labels at all")
    return np.where(observed, Y, 0.0), observed


def fit_low_rank_logistic(
    Z: np.ndarray,
    Y: np.ndarray,
    observed: np.ndarray,
    rank: int,
    alpha: float,
    *,
    trunk: np.ndarray | None = None,
    anchor: np.ndarray | None = None,
    seed: int = 0,
    max_iter: int = 300,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise mean cross-entropy over observed cells + alpha/2 (|W|^2 + |A|^2); returns (W, A, b).

    Soft labels count y times as a success and 1 - y times as a failure. The penalty on the two
    factors is the nuclear norm of W A^T at the optimum, so ``alpha`` shrinks the rank smoothly.
    With ``trunk`` (d, k) given, W is that trunk, held fixed: only the heads A, b are fitted.
    With ``anchor`` (d, k) given instead, W starts at the anchor and is fine-tuned, the penalty pulling it
    back towards the anchor (alpha/2 |W - anchor|^2) rather than towards 0: a pretrained trunk the
    new pool's labels may bend where they disagree with it.
    Starts from the leading singular vectors of Z^T (Y - mean), which is deterministic.
    """
    n, d = Z.shape
    m = Y.shape[1]
    weight = observed / max(observed.sum(), 1)
    mean = (Y * observed).sum(axis=0) / np.maximum(observed.sum(axis=0), 1)
    b0 = np.log(np.clip(mean, 1e-3, 1 - 1e-3) / np.clip(1 - mean, 1e-3, 1))
    if trunk is not None and anchor is not None:
        raise ValueError("give a trunk to hold fixed or an anchor to fine-tune from, not both")
    if trunk is None and anchor is None:
        u, s, vt = np.linalg.svd(Z.T @ ((Y - mean) * observed) / n, full_matrices=False)
        k = min(rank, len(s))
        scale = np.sqrt(s[:k] + 1e-8)
        W0, A0 = u[:, :k] * scale, vt[:k].T * scale
        if k < rank:  # more dimensions asked than the data has: pad with small seeded noise
            rng = np.random.default_rng(seed)
            W0 = np.hstack([W0, 1e-3 * rng.standard_normal((d, rank - k))])
            A0 = np.hstack([A0, 1e-3 * rng.standard_normal((m, rank - k))])
    else:
        W0 = np.asarray(trunk if trunk is not None else anchor)
        theta = Z @ W0
        A0 = np.linalg.lstsq(theta, (Y - mean) * observed, rcond=None)[0].T * 0.1
    k = W0.shape[1]

    def unpack(x):
        if trunk is not None:
            return trunk, x[: m * k].reshape(m, k), x[m * k :]
        return x[: d * k].reshape(d, k), x[d * k : d * k + m * k].reshape(m, k), x[d * k + m * k :]

    def objective(x):
        W, A, b = unpack(x)
        theta = Z @ W
        s = theta @ A.T + b
        # log(1 + e^s) - y s, stable
        loss = float((weight * (np.logaddexp(0.0, s) - Y * s)).sum())
        G = weight * (_sigmoid(s) - Y)
        gA = G.T @ theta + alpha * A
        gb = G.sum(axis=0)
        penalty = 0.5 * alpha * (A * A).sum()
        if trunk is not None:
            return loss + penalty, np.concatenate([gA.ravel(), gb])
        pull = W if anchor is None else W - anchor
        gW = Z.T @ (G @ A) + alpha * pull
        penalty += 0.5 * alpha * (pull * pull).sum()
        return loss + penalty, np.concatenate([gW.ravel(), gA.ravel(), gb])

    start = np.concatenate(([] if trunk is not None else [W0.ravel()]) + [A0.ravel(), b0])
    result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    W, A, b = unpack(result.x)
    return np.array(W), np.array(A), np.array(b)


class SharedSuccessModel:
    """P(success) for every pool model from one shared low-rank representation of the read-out.

    Same contract as :class:`~difficulty_router.learning.probes.SuccessProbe`: ``fit(X, Y, folds=...)`` with
    features (n, d) and outcomes (n, m) in [0, 1] (NaN where a model has no record), then
    ``predict_proba``/``decision_function``; ``oof_logit_``/``oof_proba_`` are out-of-fold on the
    folds given at the chosen rank and penalty, ``nested_oof_logit_``/``nested_oof_proba_`` with those
    chosen without the predicted fold (:func:`~difficulty_router.learning.probes.nested_choice`), which is what
    family selection compares; ``arrays``/``from_arrays`` save it as named float arrays.

    ``trunk``: a pretrained (standardiser, W) pair (see :meth:`trunk`, :func:`~.pretraining.pretrain_trunk`);
    the representation is then held fixed and only the per-model heads are fitted, which needs far fewer
    labels where the trunk fits the new pool. With ``fine_tune=True`` cross-validation may also choose to
    fine-tune W from the trunk (penalised towards it, :func:`fit_low_rank_logistic`'s ``anchor``): the
    way out where the pretraining corpora miss what separates the new pool's models. ``mode_`` records
    which ("scratch", "frozen" or "fine-tuned").
    """

    def __init__(
        self,
        ranks: Sequence[int] = DEFAULT_RANKS,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        cv: int = 5,
        n_components: int | None = None,
        seed: int = 0,
        trunk: tuple[Standardizer, np.ndarray] | None = None,
        fine_tune: bool = False,
    ) -> None:
        if cv < 2:
            raise ValueError(f"cv must be at least 2, got {cv}")
        if not ranks or any(int(r) < 1 for r in ranks):
            raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
        if not alphas or any(a <= 0 for a in alphas):
            raise ValueError(f"alphas must be positive, got {list(alphas)}")
        self.ranks, self.alphas = tuple(int(r) for r in ranks), tuple(float(a) for a in alphas)
        if fine_tune and trunk is None:
            raise ValueError("fine_tune=True needs a pretrained trunk to start from")
        self.cv, self.n_components, self.seed, self.trunk_in = cv, n_components, seed, trunk
        self.fine_tune = fine_tune

    def fit(self, X, Y, folds=None, names: list[str] | None = None) -> SharedSuccessModel:
        X = _check_xy(X)
        Y, observed = _check_labels(X, Y)
        if len(X) < 2 * self.cv:
            raise ValueError(f"need at least {2 * self.cv} labelled rows to fit with {self.cv}-fold CV, got {len(X)}")
        if self.trunk_in is not None:
            self.standardizer_, fixed = self.trunk_in
            if self.standardizer_.mean_.shape[0] != X.shape[1]:
                raise ValueError(
                    f"features have {X.shape[1]} columns; the trunk reads {self.standardizer_.mean_.shape[0]}"
                )
            modes = [("frozen", fixed.shape[1])] + ([("fine-tuned", fixed.shape[1])] if self.fine_tune else [])
        else:
            self.standardizer_, fixed = Standardizer(self.n_components).fit(X), None
            # rank m already lets each model be free
            modes = [("scratch", r) for r in sorted({min(r, Y.shape[1]) for r in self.ranks})]
        Z = self.standardizer_.transform(X)
        if folds is None:
            folds = shared_folds(np.where(observed, Y, 0.0), self.cv, self.seed)
        m = Y.shape[1]
        self.candidates_: list[dict] = []
        best: tuple[float, str, int, float, np.ndarray] | None = None
        candidate_logits: list[np.ndarray] = []

        def fit_rows(rows, mode: str, rank: int, alpha: float):
            return fit_low_rank_logistic(
                Z[rows],
                Y[rows],
                observed[rows],
                rank,
                alpha,
                seed=self.seed,
                trunk=fixed if mode == "frozen" else None,
                anchor=fixed if mode == "fine-tuned" else None,
            )

        for mode, rank in modes:
            for alpha in self.alphas:
                oof = np.zeros(Y.shape)
                for train, test in folds:
                    W, A, b = fit_rows(train, mode, rank, alpha)
                    oof[test] = Z[test] @ W @ A.T + b
                candidate_logits.append(oof)
                aucs = [_auroc(Y[observed[:, j], j], oof[observed[:, j], j]) for j in range(m)]
                score = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
                self.candidates_.append({"mode": mode, "rank": rank, "alpha": alpha, "cv_auroc": score})
                if best is None or score > best[0] + 1e-4:
                    best = (score, mode, rank, alpha, oof)
        assert best is not None
        _, self.mode_, self.rank_, self.alpha_, oof = best
        self.W_, self.coef_heads_, self.intercept_ = fit_rows(np.arange(len(Z)), self.mode_, self.rank_, self.alpha_)
        self.platt_ = np.zeros((m, 2))
        self.cv_auroc_ = np.full(m, np.nan)
        self.oof_logit_ = oof
        for j in range(m):
            seen = observed[:, j]
            y = Y[seen, j]
            # (almost) constant: the base rate is honest, and there is no AUROC to report
            self.platt_[j] = platt_scaling(oof[seen, j], y, len(folds))
            if not is_lopsided(y, len(folds)):
                self.cv_auroc_[j] = _auroc(y, oof[seen, j])
        self.oof_proba_ = apply_platt(self.platt_, oof)
        # rank and alpha chosen without the predicted fold: what family selection compares (see nested_choice)
        nested = nested_choice(candidate_logits, np.where(observed, Y, np.nan), folds, per_column=False)
        self.nested_oof_logit_, self.nested_oof_proba_ = nested["logit"], nested["proba"]
        self.names_ = list(names) if names is not None else [str(j) for j in range(m)]
        return self

    @property
    def coef_(self) -> np.ndarray:
        """(m, d') per-model weights on the standardised read-out: the rank-k product W A^T."""
        return self.coef_heads_ @ self.W_.T

    def representation(self, X) -> np.ndarray:
        """theta(q): the k shared dimensions of each query."""
        return self.standardizer_.transform(self._features(X)) @ self.W_

    def decision_function(self, X) -> np.ndarray:
        return self.representation(X) @ self.coef_heads_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return apply_platt(self.platt_, self.decision_function(X))

    def trunk(self) -> tuple[Standardizer, np.ndarray]:
        """The fitted representation (input transform and W), to start another pool from."""
        return self.standardizer_, self.W_

    def _features(self, X) -> np.ndarray:
        X = _check_xy(X)
        width = self.standardizer_.mean_.shape[0]
        if X.shape[1] != width:
            raise ValueError(f"features have {X.shape[1]} columns; the shared model was fitted on {width}")
        return X

    def arrays(self, prefix: str = "shared") -> dict[str, np.ndarray]:
        return part_arrays(self, prefix, SHARED_FIELDS, attributes=_SHARED_ATTRIBUTES)

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], prefix: str = "shared", mode: str | None = None
    ) -> SharedSuccessModel:
        """The saved model; ``mode`` (how it began, kept in the router's info, not the arrays) restores ``mode_``."""
        self = cls()
        if mode is not None:  # a router saved before its info recorded it has none
            self.mode_ = mode
        set_part_arrays(self, arrays, prefix, SHARED_FIELDS, attributes=_SHARED_ATTRIBUTES)
        m, k = self.coef_heads_.shape
        width = self.standardizer_.transform(self.standardizer_.mean_[None]).shape[1]
        if self.W_.shape != (width, k) or self.intercept_.shape != (m,) or self.platt_.shape != (m, 2):
            raise ValueError("saved shared success model arrays have inconsistent shapes")
        self.rank_ = k
        return self


__all__ = ["DEFAULT_ALPHAS", "DEFAULT_RANKS", "SharedSuccessModel", "fit_low_rank_logistic"]
