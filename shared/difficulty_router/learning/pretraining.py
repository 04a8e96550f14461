"""Pretraining the shared success representation across routing corpora, for a new pool to start from.

Public routing corpora each hold a different set of models answering a different set of queries
(MMLU-Pro: 29 models on exam questions; LLMRouter: 9 models on mixed tasks; RouteLLM: 2 models on
MMLU). Stacked, they form one table with a block of labels per corpus and NaN everywhere else, which
:class:`~difficulty_router.learning.shared_success.SharedSuccessModel` fits as it is: every corpus's
labels inform the one representation theta(q) = W^T z(q), and each model keeps its own head. The
fitted (standardiser, W) pair is the trunk a new pool starts from
(``SharedSuccessModel(trunk=..., fine_tune=True)``).

Whether that helps is an empirical question per pool, not a promise: ``benchmarks/pretrained_trunk.py``
measures it with learning curves, leaving out the corpus being evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from difficulty_router.learning.shared_success import DEFAULT_ALPHAS, DEFAULT_RANKS, SharedSuccessModel


def stack_corpora(corpora: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of several corpora as one table: rows stacked, each corpus's models its own
    columns, NaN where a corpus has no record of a model. Features must share one read-out (width)."""
    if not corpora:
        raise ValueError("give at least one corpus (features, labels) to pretrain on")
    widths = {np.asarray(x).shape[1] for x, _ in corpora}
    if len(widths) != 1:
        raise ValueError(f"every corpus must have the same read-out width; got widths {sorted(widths)}")
    labels = [np.asarray(y, dtype=np.float64).reshape(len(y), -1) for _, y in corpora]
    for i, ((x, _), y) in enumerate(zip(corpora, labels, strict=True)):
        if len(x) != len(y):
            raise ValueError(f"corpus {i}: {len(x)} feature rows but {len(y)} label rows")
    total = sum(y.shape[1] for y in labels)
    Y = np.full((sum(len(y) for y in labels), total), np.nan)
    row = col = 0
    for y in labels:
        Y[row : row + len(y), col : col + y.shape[1]] = y
        row, col = row + len(y), col + y.shape[1]
    return np.vstack([np.asarray(x, dtype=np.float64) for x, _ in corpora]), Y


def pretrain_trunk(
    corpora: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    ranks: Sequence[int] = DEFAULT_RANKS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    cv: int = 3,
    n_components: int | None = 128,
    seed: int = 0,
) -> SharedSuccessModel:
    """One shared success model over the stacked corpora; its :meth:`~SharedSuccessModel.trunk` is what a new
    pool starts from. Rank and penalty are chosen by cross-validated AUROC, as for one pool."""
    X, Y = stack_corpora(corpora)
    return SharedSuccessModel(ranks=ranks, alphas=alphas, cv=cv, n_components=n_components, seed=seed).fit(X, Y)


__all__ = ["pretrain_trunk", "stack_corpora"]
