"""Feature families (activation, lexical, their stack, the shared model) and how training chooses between them.

Each family yields out-of-fold P(success) on the same folds, so they are compared on equal
terms by the routing quality they would give (APGR for two-model pools, the area under the
cost-accuracy frontier otherwise, its operating points chosen on other rows than they are
scored on) and the stack is fitted on rows its inputs did not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from difficulty_router.core.metrics import apgr_cpt, curve_auc
from difficulty_router.learning.folds import shared_folds
from difficulty_router.learning.lexical import LexicalProbe
from difficulty_router.learning.logistic import _auroc, _fit_logistic, _sigmoid
from difficulty_router.learning.policies import Policy, sweep
from difficulty_router.learning.probe_arrays import LINEAR_FIELDS, part_arrays, set_part_arrays
from difficulty_router.learning.probes import SuccessProbe
from difficulty_router.learning.shared_success import SharedSuccessModel
from difficulty_router.learning.standardizer import Standardizer

#: ``shared``: one low-rank representation of the read-out with per-model heads (:mod:`.shared_success`).
#: Listed last, so it is kept only where cross-validation prefers it by more than a tie.
FAMILIES = ("activation", "lexical", "stacked", "shared")


def length_feature(texts: Sequence[str]) -> np.ndarray:
    """(n, 1) log of the prompt's length in characters: the prompt-length signal."""
    return np.log1p(np.array([[len(t)] for t in texts], dtype=np.float64))


def stack_inputs(activation_logit: np.ndarray, lexical_logit: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """What the stack reads: every model's logit from both families, and the prompt length."""
    return np.column_stack([activation_logit, lexical_logit, length_feature(texts)])


class StackedProbe:
    """Per model, a logistic regression on the families' logits for all models plus log length.

    Fitted on out-of-fold logits, so it learns how far to trust each family on rows their
    probes had not seen; its own out-of-fold predictions (``oof_proba_``) come from the same
    folds, fitting on the other folds' rows only.
    """

    def __init__(self, C: float = 1.0, seed: int = 0) -> None:
        self.C, self.seed = C, seed

    def fit(self, inputs: np.ndarray, Y: np.ndarray, folds) -> StackedProbe:
        inputs, Y = np.asarray(inputs, dtype=np.float64), np.asarray(Y, dtype=np.float64)
        self.standardizer_ = Standardizer().fit(inputs)
        Z = self.standardizer_.transform(inputs)
        m = Y.shape[1]
        self.coef_, self.intercept_ = np.zeros((m, Z.shape[1])), np.zeros(m)
        self.oof_proba_ = np.zeros(Y.shape)
        for j in range(m):
            y = Y[:, j]
            hard = (y >= 0.5).astype(int)
            if np.ptp(hard) == 0:
                self.intercept_[j] = np.log(max(y.mean(), 1e-4) / max(1 - y.mean(), 1e-4))
                self.oof_proba_[:, j] = y.mean()
                continue
            for train, test in folds:
                if np.ptp(hard[train]) == 0:
                    self.oof_proba_[test, j] = y[train].mean()
                    continue
                w, b = _fit_logistic(Z[train], y[train], self.C, self.seed)
                self.oof_proba_[test, j] = _sigmoid(Z[test] @ w + b)
            self.coef_[j], self.intercept_[j] = _fit_logistic(Z, y, self.C, self.seed)
        return self

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        Z = self.standardizer_.transform(np.asarray(inputs, dtype=np.float64))
        if Z.shape[1] != self.coef_.shape[1]:
            raise ValueError(f"the stack reads {self.coef_.shape[1]} inputs, got {Z.shape[1]}")
        return _sigmoid(Z @ self.coef_.T + self.intercept_)

    def arrays(self, prefix: str = "stack") -> dict[str, np.ndarray]:
        return part_arrays(self, prefix, LINEAR_FIELDS)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "stack") -> StackedProbe:
        self = cls()
        set_part_arrays(self, arrays, prefix, LINEAR_FIELDS)
        m, k = self.coef_.shape
        if self.intercept_.shape != (m,) or self.standardizer_.mean_.shape != (k,):
            raise ValueError("saved stack arrays have inconsistent shapes")
        return self


def routing_quality(
    proba: np.ndarray, scores: np.ndarray, costs: np.ndarray, capability: np.ndarray, seed: int = 0
) -> float:
    """One number to compare predictors by: APGR of the utility ranking for two models, else held-out frontier AUC."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] == 2:
        weak, strong = np.argsort(capability)
        try:
            return apgr_cpt(proba[:, strong] - proba[:, weak], scores[:, weak], scores[:, strong], seed)["apgr"]
        except ValueError:  # strong no better than weak on these rows: fall back to the frontier
            pass
    return heldout_frontier_auc(proba, scores, costs, capability, seed)


def heldout_frontier_auc(
    proba: np.ndarray, scores: np.ndarray, costs: np.ndarray, capability: np.ndarray, seed: int = 0, repeats: int = 2
) -> float:
    """Frontier AUC whose operating points are chosen on one half of the rows and scored on the other.

    Why: the in-sample frontier takes, at every budget, the best of ~240 utility settings on
    the very rows it scores, and that maximum rewards noise: a predictor near chance scatters
    its points widely and some land high by luck. Here each budget takes the setting that is
    best on half A and counts its accuracy on half B (and the other way round, over ``repeats``
    random halvings), which is what a user who picks an operating point on their labels gets on
    new queries. Costs span the cheapest to the dearest model.

    What it does not remove: a chance-level predictor still scatters queries between neighbouring
    models, which traces the chord between single models, and the area credits that; on a
    synthetic one-axis pool of 8 models such a predictor scores about as high as the true
    probabilities (tests/test_families.py).
    """
    scores, costs = np.asarray(scores, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    model_costs = costs.mean(axis=0)
    lo, hi = float(model_costs.min()), float(model_costs.max())
    n = len(scores)
    if n < 4:
        raise ValueError(f"the held-out frontier needs at least 4 labelled rows, got {n}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(repeats):
        order = rng.permutation(n)
        halves = order[: n // 2], order[n // 2 :]
        points = [sweep(Policy("utility"), proba[h], costs[h], capability, scores[h]) for h in halves]
        # the settings best within each budget on one half, valued by their accuracy on the other
        accuracy = [[p["accuracy"] for p in half] for half in points]
        values += [curve_auc(points[0], lo, hi, scored=accuracy[1]), curve_auc(points[1], lo, hi, scored=accuracy[0])]
    return float(np.mean(values))


def mean_auroc(proba: np.ndarray, scores: np.ndarray) -> float:
    values = [a for a in (_auroc(scores[:, j], proba[:, j]) for j in range(scores.shape[1])) if np.isfinite(a)]
    return float(np.mean(values)) if values else float("nan")


@dataclass
class FamilyFit:
    """The fitted probes of every family tried, their out-of-fold predictions and the comparison table."""

    family: str
    probe: SuccessProbe
    lexical: LexicalProbe | None
    stack: StackedProbe | None
    oof: dict[str, np.ndarray]
    table: list[dict] = field(default_factory=list)
    shared: SharedSuccessModel | None = None


def fit_families(
    features: np.ndarray,
    texts: Sequence[str],
    scores: np.ndarray,
    costs: np.ndarray,
    capability: np.ndarray,
    *,
    families: Sequence[str] = FAMILIES,
    cv: int = 5,
    n_components: int | None = None,
    seed: int = 0,
    progress: bool = False,
    names: Sequence[str] | None = None,
    trunk: Any = None,
) -> FamilyFit:
    """Fit each family on the same folds and keep the one with the best out-of-fold routing quality.

    The activation probe is always fitted (the stack and the difficulty read-out use it).
    A tie within 1e-4 goes to the family listed first in ``families``. ``trunk``: a pretrained shared
    representation (a fitted :class:`SharedSuccessModel` or its ``trunk()`` pair, e.g. from
    :func:`~difficulty_router.learning.pretraining.pretrain_trunk`) for the shared family to start from,
    held fixed or fine-tuned as cross-validation prefers; it must read the same read-out as ``features``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if trunk is not None and "shared" not in families:
        raise ValueError(f"a pretrained trunk is for the shared family, which families={list(families)} leaves out")
    start = _checked_trunk(trunk, np.asarray(features).shape[1])  # before any fitting
    folds = shared_folds(scores, cv, seed)
    probe = SuccessProbe(cv=cv, n_components=n_components, seed=seed).fit(
        features, scores, progress=progress, names=list(names) if names is not None else None, folds=folds
    )
    # nested: hyperparameters chosen without the predicted fold, so a noisy family gains nothing by selection
    oof = {"activation": probe.nested_oof_proba_}
    lexical = stack = None
    skipped = {}
    if "lexical" in families or "stacked" in families:
        try:
            lexical = LexicalProbe(cv=cv, seed=seed).fit(texts, scores, folds=folds, progress=progress)
            oof["lexical"] = lexical.nested_oof_proba_
        except ValueError as exc:  # e.g. no n-gram occurs twice in a tiny or unusual training set
            if "activation" not in families:
                raise ValueError(f"the lexical family cannot be fitted on these rows: {exc}") from None
            skipped = {"lexical": str(exc), "stacked": f"needs the lexical family: {exc}"}
    if "stacked" in families and lexical is not None:
        inputs = stack_inputs(probe.nested_oof_logit_, lexical.nested_oof_logit_, texts)
        stack = StackedProbe(seed=seed).fit(inputs, scores, folds)
        oof["stacked"] = stack.oof_proba_
    shared = None
    if "shared" in families:
        shared = SharedSuccessModel(
            cv=cv, n_components=n_components, seed=seed, trunk=start, fine_tune=start is not None
        ).fit(features, scores, folds=folds, names=list(names) if names is not None else None)
        oof["shared"] = shared.nested_oof_proba_
    table = [
        {
            "family": f,
            "cv_routing_quality": routing_quality(oof[f], scores, costs, capability, seed),
            "cv_auroc": mean_auroc(oof[f], scores),
        }
        if f in oof
        else {"family": f, "cv_routing_quality": None, "cv_auroc": None, "skipped": skipped[f]}
        for f in families
    ]
    scored: list[dict[str, Any]] = [row for row in table if row["cv_routing_quality"] is not None]
    best = scored[0]
    for row in scored[1:]:
        if float(row["cv_routing_quality"]) > float(best["cv_routing_quality"]) + 1e-4:
            best = row
    return FamilyFit(str(best["family"]), probe, lexical, stack, oof, table, shared)


def _checked_trunk(trunk: Any, width: int) -> Any:
    """(standardiser, W) from a pretrained trunk given as a fitted shared model or that pair; None stays None."""
    if trunk is None:
        return None
    if isinstance(trunk, SharedSuccessModel):
        trunk = trunk.trunk()
    try:
        standardizer, W = trunk
        reads = standardizer.mean_.shape[0]
    except (TypeError, ValueError, AttributeError):
        raise ValueError("trunk must be a fitted SharedSuccessModel or its trunk() pair (standardiser, W)") from None
    if reads != width:
        raise ValueError(
            f"the pretrained trunk reads {reads} read-out columns but the router's read-out has {width}: "
            "train with the read-out (layers, pooling) the trunk was pretrained on"
        )
    return standardizer, np.asarray(W, dtype=np.float64)
