"""Train a router from Parquet feature shards, in memory while the features fit, streamed beyond.

The outcomes file (prompts and per-model scores) is small next to the features; its prompts are tokenised
to find their rows in the shards by content key. When the features fit ``memory_budget`` they are looked
up (only the rows the outcomes need) and :func:`train_router` runs as usual at the shards' read-out.
Otherwise the activation probe is fitted out of core, one shard batch at a time:

- pass 1 streams the per-feature mean and variance (the probe's standardiser, exact) and keeps a
  reservoir sample of rows for the novelty score;
- each epoch streams the shards again and takes an SGD step of L2 logistic regression (log loss,
  ``alpha = 1 / (C n)``: the objective of the in-memory fit) per model and per candidate ``C``;
- a held-out share of the rows (a seeded draw) picks ``C`` by AUROC, fits the Platt calibration and the
  operating point, as the out-of-fold predictions do in memory.

The result is a :class:`DifficultyRouter` with the ``activation`` family, saved and loaded like any other.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from difficulty_router.core.pool import ModelPool
from difficulty_router.data.queries import conversation_text
from difficulty_router.extraction.extractor import ActivationExtractor
from difficulty_router.extraction.feature_cache import FeatureCache
from difficulty_router.extraction.readout import Extraction
from difficulty_router.learning.logistic import _auroc, _logit, _sigmoid, platt_scaling
from difficulty_router.learning.novelty import NoveltyScore
from difficulty_router.learning.policies import Policy, dominated
from difficulty_router.learning.probe_arrays import calibrated_probe_arrays
from difficulty_router.learning.probes import SuccessProbe
from difficulty_router.routing.calibration import realised_costs
from difficulty_router.routing.router import DifficultyRouter
from difficulty_router.scale.shards import FeatureShards
from difficulty_router.training.operating_point import default_operating_point

logger = logging.getLogger(__name__)

#: Bytes the in-memory fit needs per feature value: float64 features, their standardised copy and the
#: soft-label stacking inside the logistic fits.
BYTES_PER_VALUE_IN_MEMORY = 24
STREAMED_CS = (0.0003, 0.001, 0.003)
NOVELTY_SAMPLE = 4096


def shard_keys(extractor: ActivationExtractor, shards: FeatureShards, queries) -> tuple[list[str], np.ndarray]:
    """Each query's content key at the shards' read-out, and its token count; refuses shards extracted with
    another model, numeric path or ``max_tokens`` (their keys would silently match nothing)."""
    m = shards.manifest
    if m["cache_key"] != extractor._cache_key or int(m["max_tokens"]) != extractor.max_tokens:
        raise ValueError(
            f"the shards at {shards.directory} were extracted by {m['model_id']} ({m['dtype']}, max_tokens "
            f"{m['max_tokens']}); the extractor is {extractor.model_id} "
            f"({str(extractor.dtype).split('.')[-1]}, max_tokens {extractor.max_tokens})"
        )
    ids, _ = extractor.tokenize(queries)
    keys = [FeatureCache.row_key(m["cache_key"], shards.layers, shards.pooling, x) for x in ids]
    return keys, np.array([len(x) for x in ids])


def in_memory_bytes(n_rows: int, width: int) -> int:
    return n_rows * width * BYTES_PER_VALUE_IN_MEMORY


def train_from_shards(
    outcomes,
    pool: ModelPool,
    extractor: ActivationExtractor,
    shards: FeatureShards | str,
    *,
    memory_budget: int = 4 << 30,
    policy: str = "utility",
    cv: int = 5,
    seed: int = 0,
    epochs: int = 10,
    holdout: float = 0.2,
    batch_rows: int = 4096,
    max_accuracy_drop: float = 0.01,
    progress: bool = True,
    **train_kwargs: Any,
) -> DifficultyRouter:
    """A router for ``outcomes`` from features in ``shards`` (a directory or :class:`FeatureShards`).

    In memory (:func:`train_router` at the shards' read-out) when the fit needs at most ``memory_budget``
    bytes, else streamed (the module docstring says how); ``router.info["training"]["features_from"]``
    records which and why.
    """
    if not isinstance(shards, FeatureShards):
        shards = FeatureShards(shards)
    if not 0.0 < holdout < 0.5:
        raise ValueError(f"holdout must lie in (0, 0.5), got {holdout}")
    pool.check_against(outcomes.models)
    outcomes = outcomes.select_models(pool.names)
    keys, n_tokens = shard_keys(extractor, shards, outcomes.queries)
    need = in_memory_bytes(len(keys), shards.width)
    where = {"shards": str(shards.directory), "bytes_in_memory": need, "memory_budget": memory_budget}
    if need <= memory_budget:
        from difficulty_router.training.train import train_router

        features = shards.lookup(keys, batch_rows)
        extraction = Extraction(
            features=features,
            layers=shards.layers,
            pooling=shards.pooling,
            hidden_size=int(shards.manifest["hidden_size"]),
            n_tokens=n_tokens,
            truncated=n_tokens >= extractor.max_tokens,
            model_id=extractor.model_id,
            model_hash=extractor.model_hash,
        )
        router = train_router(
            outcomes,
            pool,
            extractor,
            layers=list(shards.layers),
            pooling=shards.pooling,
            policy=policy,
            cv=cv,
            seed=seed,
            progress=progress,
            extraction=extraction,
            max_accuracy_drop=max_accuracy_drop,
            **train_kwargs,
        )
        router.info["training"]["features_from"] = {"mode": "in-memory", **where}
        return router
    keep_models = tuple(train_kwargs.pop("keep_models", ()) or ())
    families = tuple(train_kwargs.pop("families", ("activation",)))
    if "activation" not in families:
        raise ValueError(f"the streamed fit fits the activation family only; families {families} exclude it")
    if train_kwargs:
        raise ValueError(f"the streamed fit takes no {sorted(train_kwargs)}")
    where["families_compared"] = "activation only (the lexical family needs every prompt's text in memory)"
    return _train_streamed(
        outcomes, pool, extractor, shards, keys, where, policy, seed, epochs, holdout, batch_rows,
        max_accuracy_drop, progress, keep_models,
    )  # fmt: skip


def _rows_of(keys: list[str]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    return rows


def _matched(shards: FeatureShards, rows: dict[str, list[int]], batch_rows: int):
    """Stream ``(outcome row indexes, features)`` for the shard rows the outcomes use."""
    for batch_keys, feats, _n, _t in shards.iter_batches(batch_rows):
        pick, where = [], []
        for r, key in enumerate(batch_keys):
            for i in rows.get(key, ()):
                pick.append(r)
                where.append(i)
        if pick:
            yield np.array(where), feats[pick].astype(np.float64)


def stream_standardiser(shards, rows, train_mask, batch_rows, rng, sample_size: int = NOVELTY_SAMPLE):
    """Pass 1: per-feature mean and std over the training rows (what :class:`Standardizer` computes in memory)
    and a reservoir sample of all matched rows; refuses outcome rows missing from the shards."""
    n, width = len(train_mask), shards.width
    total, total_sq, count, seen = np.zeros(width), np.zeros(width), 0, np.zeros(n, dtype=bool)
    sample, sample_seen = np.empty((sample_size, width)), 0
    for idx, X in _matched(shards, rows, batch_rows):
        seen[idx] = True
        train = train_mask[idx]
        total += X[train].sum(0)
        total_sq += (X[train] ** 2).sum(0)
        count += int(train.sum())
        for x in X:
            if sample_seen < sample_size:
                sample[sample_seen] = x
            else:
                slot = int(rng.integers(0, sample_seen + 1))
                if slot < sample_size:
                    sample[slot] = x
            sample_seen += 1
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} of {n} outcome rows are not in the shards at {shards.directory}")
    mean = total / count
    scale = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0)) + 1e-6
    return mean, scale, count, sample[: min(sample_seen, sample_size)]


def stream_logistic(shards, rows, scores, train_mask, mean, scale, count, Cs, epochs, batch_rows, seed, progress=False):
    """L2 logistic regression per model (column of ``scores``) and per ``C`` by averaged SGD over streamed
    mini-batches: ``alpha = 1 / (C n)`` makes SGD's objective the in-memory fit's (``C`` times the summed log
    loss plus half the squared weights, divided by ``C n``). Soft labels count ``y`` times as 1 and ``1 - y``
    times as 0, as in memory. Models always right or always wrong on the training rows get no classifier."""
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(seed)
    hard = (scores >= 0.5).astype(int)
    models = {
        (j, C): SGDClassifier(loss="log_loss", alpha=1.0 / (C * count), random_state=seed, average=True)
        for j in range(scores.shape[1])
        if hard[train_mask, j].min() != hard[train_mask, j].max()
        for C in Cs
    }
    for _epoch in tqdm(range(epochs), disable=not progress, desc="streamed probe fit", unit="epoch"):
        for idx, X in _matched(shards, rows, batch_rows):
            train = train_mask[idx]
            if not train.any():
                continue
            Z = (X[train] - mean) / scale
            order = rng.permutation(len(Z))
            Z, y = Z[order], scores[idx[train][order]]
            Z2, labels = np.vstack([Z, Z]), np.r_[np.ones(len(Z)), np.zeros(len(Z))]
            for (j, _C), clf in models.items():
                clf.partial_fit(Z2, labels, classes=[0, 1], sample_weight=np.r_[y[:, j], 1 - y[:, j]])
    return models


def _train_streamed(
    outcomes,
    pool,
    extractor,
    shards,
    keys,
    where,
    policy,
    seed,
    epochs,
    holdout,
    batch_rows,
    max_drop,
    progress,
    keep_models=(),
) -> DifficultyRouter:
    n, width = len(keys), shards.width
    scores = np.asarray(outcomes.scores, dtype=np.float64)
    m = scores.shape[1]
    rng = np.random.default_rng(seed)
    held = rng.random(n) < holdout
    rows = _rows_of(keys)

    mean, scale, count, sample = stream_standardiser(shards, rows, ~held, batch_rows, rng)
    models = stream_logistic(
        shards, rows, scores, ~held, mean, scale, count, STREAMED_CS, epochs, batch_rows, seed, progress
    )
    constant = [all(key[0] != j for key in models) for j in range(m)]

    # held-out logits of every candidate, then C, Platt and the operating point on them
    held_idx = np.flatnonzero(held)
    logits = {key: np.zeros(n) for key in models}
    for idx, X in _matched(shards, rows, batch_rows):
        test = held[idx]
        if test.any():
            Z = (X[test] - mean) / scale
            for key, clf in models.items():
                logits[key][idx[test]] = clf.decision_function(Z)
    coef, intercept = np.zeros((m, width)), np.zeros(m)
    platt, chosen_C, auroc = np.zeros((m, 2)), np.zeros(m), np.full(m, np.nan)
    held_proba = np.zeros((len(held_idx), m))
    for j in range(m):
        y = scores[held_idx, j]
        if constant[j]:
            rate = scores[~held, j].mean()
            platt[j] = (0.0, _logit(rate))
            held_proba[:, j] = rate
            continue
        aucs = {C: _auroc(y, logits[(j, C)][held_idx]) for C in STREAMED_CS}
        best = max(STREAMED_CS, key=lambda C: np.nan_to_num(aucs[C], nan=-1.0))
        clf = models[(j, best)]
        coef[j], intercept[j] = clf.coef_[0], clf.intercept_[0]
        chosen_C[j], auroc[j] = best, aucs[best]
        s = logits[(j, best)][held_idx]
        platt[j] = platt_scaling(s, y)  # a held-out share has no folds: one row of each class is enough
        held_proba[:, j] = _sigmoid(platt[j, 0] * s + platt[j, 1])
    probe = SuccessProbe.from_arrays(
        calibrated_probe_arrays(
            "success", mean=mean, scale=scale, coef=coef, intercept=intercept, platt=platt, C=chosen_C, cv_auroc=auroc
        )
    )
    probe.names_ = list(pool.names)

    held_out = outcomes.subset(held_idx)
    texts = [conversation_text(c) for c in outcomes.queries]
    costs = pool.costs([len(t) for t in texts])
    capability = scores[~held].mean(axis=0)
    realised = realised_costs(outcomes, costs)
    dropped = dominated(capability, realised[~held].mean(axis=0), pool.names, keep=keep_models)
    router = DifficultyRouter(
        extractor,
        pool,
        probe,
        layers=shards.layers,
        pooling=shards.pooling,
        capability=capability,
        policy=Policy(policy),
        family="activation",
        dropped=dropped,
        novelty=NoveltyScore(seed=seed).fit(sample),
    )
    point = default_operating_point(
        router, held_proba, scores[held_idx], costs[held_idx], realised[held_idx], max_accuracy_drop=max_drop, seed=seed
    )
    router.policy = point.policy
    router.info = {
        "training": {
            **outcomes.summary(),
            "features_from": {
                "mode": "streamed",
                **where,
                "epochs": epochs,
                "held_out_rows": len(held_idx),
                "candidate_C": list(STREAMED_CS),
                "solver": "SGDClassifier(log_loss, averaged), alpha = 1/(C n)",
            },
        },
        "readout_sweep": [],
        "readout": {"layers": list(shards.layers), "pooling": list(shards.pooling)},
        "readout_choice": {"rule": "fixed by the shards"},
        "family": "activation",
        "families": [],
        "cv_auroc": {name: float(a) for name, a in zip(pool.names, auroc, strict=True)},
        "regularisation_C": {name: float(c) for name, c in zip(pool.names, chosen_C, strict=True)},
        **point.info(),
        "dropped_models": dropped,
        "held_out_summary": held_out.summary(),
        "seed": seed,
    }
    return router
