"""Fit a DifficultyRouter from an outcomes file: read-out sweep, probes, default operating point."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from difficulty_router.core.pool import ModelPool
from difficulty_router.data.outcomes import Outcomes
from difficulty_router.data.queries import conversation_text
from difficulty_router.extraction.extractor import ActivationExtractor
from difficulty_router.extraction.numerics import dtype_name
from difficulty_router.extraction.readout import normalise_layers, normalise_pooling
from difficulty_router.learning.families import FAMILIES, fit_families
from difficulty_router.learning.logistic import _auroc
from difficulty_router.learning.novelty import NoveltyScore
from difficulty_router.learning.policies import Policy, complementary, dominated
from difficulty_router.learning.probes import DifficultyProbe
from difficulty_router.learning.readout_scores import bootstrap_mean_auroc, readout_oof
from difficulty_router.learning.risk_control import DEFAULT_DELTA, check_levels, computes_point
from difficulty_router.routing.calibration import realised_costs
from difficulty_router.routing.router import DifficultyRouter
from difficulty_router.training.operating_point import default_operating_point

logger = logging.getLogger(__name__)

# Middle layers first: the papers find success is most linearly readable around mid-depth.
DEFAULT_CANDIDATE_LAYERS = (0.5, 0.4, 0.6, 0.3, 0.7)
READOUT_POOLINGS = (("last",), ("mean",), ("last", "mean"))
LATENCY_QUERIES = 5  # training prompts timed one at a time to record a read-out's cost


def _sweep_models(scores: np.ndarray, limit: int = 8) -> list[int]:
    """The models whose success is least lopsided: they carry most signal for choosing a read-out."""
    balance = np.abs(scores.mean(axis=0) - 0.5)
    return list(np.argsort(balance)[:limit])


def select_readout(
    extraction,
    scores: np.ndarray,
    poolings=READOUT_POOLINGS,
    seed: int = 0,
    progress: bool = False,
    prefer_shallow: bool = True,
    latency_ms: dict[int, float] | None = None,
    max_readout_ms: float | None = None,
    resamples: int = 200,
) -> tuple[tuple[int, ...], tuple[str, ...], list[dict], dict]:
    """Cross-validated AUROC of a quick probe for each (layer, pooling); returns the choice, the table and why.

    A read-out's cost grows with its depth (every block below it runs per query), so with
    ``prefer_shallow`` the choice is the shallowest layer with a candidate whose AUROC is within the
    best's 95% interval: the paired bootstrap interval (over rows, same folds) of its difference
    to the best contains 0. At that layer the best pooling wins (poolings cost the same).
    ``max_readout_ms`` drops layers whose measured single-query latency (``latency_ms``) exceeds it;
    if none fits, the fastest measured layer is kept and the record says the cap was not met.
    """
    cols = _sweep_models(scores)
    table: list[dict[str, Any]] = []
    oofs: list[tuple[Any, Any]] = []
    oof: np.ndarray | None
    hard: np.ndarray | None
    candidates = [(layer, pools) for layer in extraction.layers for pools in poolings]
    for layer, pools in tqdm(
        candidates, disable=not progress or len(candidates) == 1, desc="read-out sweep", unit="candidate"
    ):
        if len(candidates) > 1:
            oof, hard = readout_oof(
                extraction.select(layers=[layer], pooling=pools).features, scores[:, cols], seed=seed
            )
            aucs = [_auroc(hard[:, j], oof[:, j]) for j in range(hard.shape[1])]
            score = float(np.mean(aucs)) if aucs else float("nan")
        else:
            oof = hard = None
            score = float("nan")
        oofs.append((oof, hard))
        table.append({"layer": layer, "pooling": "+".join(pools), "cv_auroc": score})
    best_i = max(range(len(table)), key=lambda i: np.nan_to_num(table[i]["cv_auroc"], nan=-1.0))
    best = table[best_i]
    choice: dict[str, Any] = {
        "rule": "best cv_auroc",
        "best": {"layer": best["layer"], "pooling": best["pooling"]},
        "max_readout_ms": max_readout_ms,
    }
    usable = list(range(len(table)))
    if len(candidates) > 1 and (prefer_shallow or max_readout_ms is not None) and oofs[best_i][1].shape[1]:
        n = len(oofs[best_i][0])
        draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        base = bootstrap_mean_auroc(oofs[best_i][0], oofs[best_i][1], draws)
        for i, row in enumerate(table):
            diff = bootstrap_mean_auroc(oofs[i][0], oofs[i][1], draws) - base
            lo, hi = np.nanpercentile(diff, [2.5, 97.5])
            row["diff_to_best_ci"] = [float(lo), float(hi)]
            row["within_best_interval"] = bool(hi >= 0)
        if prefer_shallow:
            usable = [i for i in usable if table[i]["within_best_interval"]]
            choice["rule"] = "shallowest layer within the best's 95% interval"
        if max_readout_ms is not None and latency_ms:
            fits = [i for i in usable if latency_ms.get(table[i]["layer"], np.inf) <= max_readout_ms]
            if fits:
                usable = fits
                choice["rule"] += f", at most {max_readout_ms} ms"
            else:
                fastest = min(latency_ms, key=lambda layer: latency_ms[layer])
                usable = [i for i in range(len(table)) if table[i]["layer"] == fastest]
                choice["rule"] += f"; no layer met {max_readout_ms} ms, the fastest measured kept"
                choice["cap_met"] = False
    if prefer_shallow:
        shallowest = min(table[i]["layer"] for i in usable)
        usable = [i for i in usable if table[i]["layer"] == shallowest]
    pick = max(usable, key=lambda i: np.nan_to_num(table[i]["cv_auroc"], nan=-1.0))
    chosen = table[pick]
    choice["chosen"] = {"layer": chosen["layer"], "pooling": chosen["pooling"], "cv_auroc": chosen["cv_auroc"]}
    return (chosen["layer"],), tuple(chosen["pooling"].split("+")), table, choice


def train_router(
    outcomes: Outcomes,
    pool: ModelPool,
    extractor: ActivationExtractor | None = None,
    *,
    layers: Sequence[Any] | None = None,
    pooling: str | Sequence[str] | None = None,
    policy: str = "utility",
    cv: int = 5,
    n_components: int | None = None,
    max_accuracy_drop: float = 0.01,
    guarantee: bool = False,
    delta: float = DEFAULT_DELTA,
    seed: int = 0,
    progress: bool = True,
    families: Sequence[str] = FAMILIES,
    keep_models: Sequence[str] = (),
    prefer_shallow: bool = True,
    max_readout_ms: float | None = None,
    extraction=None,
    trunk=None,
) -> DifficultyRouter:
    """Train per-model success probes on ``outcomes`` and return a router ready to ``route``.

    With ``layers``/``pooling`` left as None the read-out is chosen by cross-validated AUROC
    over middle layers and the three poolings. The default operating point is the cheapest
    setting, on out-of-fold predictions, within ``max_accuracy_drop`` of the best single model.
    ``router.info["risk_controlled_operating_point"]`` records the guaranteed version
    (:mod:`~difficulty_router.learning.risk_control`): the cheapest setting whose expected drop on unseen
    queries is at most ``max_accuracy_drop`` with probability ``1 - delta``, with its upper bound and
    realised drop; ``guarantee=True`` makes it the router's policy.

    ``families`` are the predictors of success compared by cross-validated routing quality
    on the same folds (APGR for two models, frontier AUC otherwise): ``activation`` (the
    read-out probe), ``lexical`` (tf-idf n-grams), ``stacked`` (both plus prompt length) and ``shared`` (one
    low-rank representation of the read-out for the whole pool, small per-model heads).
    The best is kept and the table goes into ``router.info["families"]``.

    The read-out sweep prefers the shallowest layer whose AUROC is within the best's 95% interval
    (``prefer_shallow``; cost is proportional to depth) and, with ``max_readout_ms``, only layers whose
    measured single-query latency on this machine fits; ``router.info["readout_choice"]`` records the
    rule, the best and chosen read-outs and the chosen one's measured latency.

    Models another pool model beats on both training accuracy and mean cost are dropped from
    routing (kept as a last resort) unless named in ``keep_models`` or the out-of-fold predictions
    show routing some queries to them gains accuracy (:func:`~difficulty_router.learning.policies.complementary`;
    ``router.info["complementary_models"]`` says why). The utility policy's
    margin is fitted on out-of-fold predictions (:func:`~difficulty_router.learning.policies.fit_margin`).

    ``trunk``: a shared representation pretrained on other corpora
    (:func:`~difficulty_router.learning.pretraining.pretrain_trunk`) for the ``shared`` family to start from
    (heads on it, or W fine-tuned from it, as cross-validation prefers); give ``layers``/``pooling`` equal to
    the trunk's read-out. ``router.info["shared_start"]`` says how the shared family began. Measured in
    ``benchmarks/pretrained_trunk.py``: it helps where the pretraining corpora resemble the pool.

    ``extraction``: features already extracted for ``outcomes.queries`` (e.g. read from Parquet shards by
    :func:`difficulty_router.scale.shard_training.train_from_shards`) at the fixed ``layers``/``pooling``.
    """
    if computes_point(max_accuracy_drop, guarantee):
        check_levels(max_accuracy_drop, delta)  # before any extraction
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families}")
    pinned = [m for m in keep_models if m not in pool.names]
    if pinned:
        raise ValueError(f"keep_models {pinned} are not in the pool {pool.names}")
    pool.check_against(outcomes.models)
    outcomes = outcomes.select_models(pool.names)
    if len(outcomes) < 2 * cv:
        raise ValueError(f"need at least {2 * cv} labelled rows to train, got {len(outcomes)}")
    extractor = extractor or ActivationExtractor()
    candidate_layers = normalise_layers(layers if layers is not None else DEFAULT_CANDIDATE_LAYERS, extractor.n_layers)
    if extraction is not None and (layers is None or pooling is None or len(extraction) != len(outcomes)):
        raise ValueError("a given extraction needs the fixed layers and pooling, and one row per outcome")
    if layers is not None and pooling is not None:  # a fixed read-out: every given layer, concatenated
        if extraction is None:
            extraction = extractor.extract(
                outcomes.queries, layers=candidate_layers, pooling=pooling, progress=progress
            )
        chosen_layers, chosen_pooling = extraction.layers, extraction.pooling
        sweep_table: list[dict] = []
        choice: dict[str, Any] = {"rule": "fixed by the caller"}
    else:  # sweep one layer at a time, with the given pooling or all three
        poolings = READOUT_POOLINGS if pooling is None else (normalise_pooling(pooling),)
        extraction = extractor.extract(outcomes.queries, layers=candidate_layers, pooling="both", progress=progress)
        latency = (
            {
                layer: extractor.readout_latency_ms(outcomes.queries[:LATENCY_QUERIES], layer)
                for layer in candidate_layers
            }
            if max_readout_ms is not None
            else None
        )
        chosen_layers, chosen_pooling, sweep_table, choice = select_readout(
            extraction,
            outcomes.scores,
            poolings,
            seed,
            progress,
            prefer_shallow=prefer_shallow,
            latency_ms=latency,
            max_readout_ms=max_readout_ms,
        )
        extraction = extraction.select(layers=chosen_layers, pooling=chosen_pooling)
    deepest = max(chosen_layers)
    choice["latency_ms_p50"] = extractor.readout_latency_ms(outcomes.queries[:LATENCY_QUERIES], deepest)
    choice["relative_cost"] = deepest / extractor.n_layers  # blocks run per query, as a share of the model
    choice["measured_on"] = f"{extractor.device.type}, {dtype_name(extractor.dtype)}, {extractor.threads} threads"
    texts = [conversation_text(c) for c in outcomes.queries]
    costs = pool.costs([len(t) for t in texts])
    capability = outcomes.scores.mean(axis=0)
    fit = fit_families(
        extraction.features,
        texts,
        outcomes.scores,
        costs,
        capability,
        families=families,
        cv=cv,
        n_components=n_components,
        seed=seed,
        progress=progress,
        names=pool.names,
        trunk=trunk,
    )
    probe, family = fit.probe, fit.family
    difficulty_probe = None
    if outcomes.difficulty is not None and (outcomes.difficulty > 0).sum() >= 20:
        labelled = outcomes.difficulty > 0
        difficulty_probe = DifficultyProbe().fit(extraction.features[labelled], outcomes.difficulty[labelled])
    realised = realised_costs(outcomes, costs)
    dropped = dominated(capability, realised.mean(axis=0), pool.names, keep=tuple(keep_models))
    # complementarity: a dominated model comes back where the out-of-fold predictions find it useful
    readmitted = complementary(fit.oof[family], outcomes.scores, costs, capability, dropped, pool.names)
    dropped = {m: reason for m, reason in dropped.items() if m not in readmitted}
    router = DifficultyRouter(
        extractor,
        pool,
        probe,
        layers=chosen_layers,
        pooling=chosen_pooling,
        capability=capability,
        policy=Policy(policy),
        difficulty_probe=difficulty_probe,
        family=family,
        lexical=fit.lexical if family in ("lexical", "stacked") else None,
        stack=fit.stack if family == "stacked" else None,
        shared=fit.shared if family == "shared" else None,
        dropped=dropped,
        novelty=NoveltyScore(seed=seed).fit(extraction.features),
    )
    # Default operating point and a policy comparison, on out-of-fold probabilities: rows the probes did not fit.
    point = default_operating_point(
        router,
        fit.oof[family],
        outcomes.scores,
        costs,
        realised,
        max_accuracy_drop=max_accuracy_drop,
        seed=seed,
        guarantee=guarantee,
        delta=delta,
    )
    router.policy = point.policy
    router.info = {
        "training": outcomes.summary(),
        "readout_sweep": sweep_table,
        "readout": {"layers": list(chosen_layers), "pooling": list(chosen_pooling)},
        "readout_choice": choice,
        "family": family,
        "families": fit.table,
        "lexical_candidates": fit.lexical.candidate_scores_ if fit.lexical is not None else [],
        "cv_auroc": {m: float(a) for m, a in zip(pool.names, probe.cv_auroc_, strict=False)},
        "regularisation_C": {m: float(c) for m, c in zip(pool.names, probe.C_, strict=False)},
        **point.info(),
        "dropped_models": dropped,
        "complementary_models": readmitted,
        "shared_start": None if fit.shared is None else {"mode": fit.shared.mode_, "rank": int(fit.shared.rank_)},
        "truncated_prompts": int(extraction.truncated.sum()),
        "seed": seed,
    }
    router.family_fit_ = fit  # type: ignore[attr-defined]  # every family's probes and out-of-fold predictions, for diagnostics; not saved
    return router
