"""Fit a DifficultyRouter from an outcomes file: read-out sweep, probes, default operating point."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .data import Outcomes
from .extractor import ActivationExtractor, normalise_layers, normalise_pooling
from .families import FAMILIES, fit_families
from .metrics import apgr_cpt
from .novelty import NoveltyScore
from .policies import Policy, dominated, fit_margin, pick_operating_point, sweep
from .pool import ModelPool
from .probes import DifficultyProbe, readout_score
from .queries import conversation_text
from .router import DifficultyRouter, realised_costs

logger = logging.getLogger(__name__)

# Middle layers first: the papers find success is most linearly readable around mid-depth.
DEFAULT_CANDIDATE_LAYERS = (0.5, 0.4, 0.6, 0.3, 0.7)
READOUT_POOLINGS = (("last",), ("mean",), ("last", "mean"))


def _sweep_models(scores: np.ndarray, limit: int = 8) -> list[int]:
    """The models whose success is least lopsided: they carry most signal for choosing a read-out."""
    balance = np.abs(scores.mean(axis=0) - 0.5)
    return list(np.argsort(balance)[:limit])


def select_readout(extraction, scores: np.ndarray, poolings=READOUT_POOLINGS, seed: int = 0,
                   progress: bool = False) -> tuple[tuple[int, ...], tuple[str, ...], list[dict]]:
    """Cross-validated AUROC of a quick probe for each (layer, pooling); returns the best and the table."""
    cols = _sweep_models(scores)
    table = []
    candidates = [(layer, pools) for layer in extraction.layers for pools in poolings]
    for layer, pools in tqdm(candidates, disable=not progress or len(candidates) == 1, desc="read-out sweep",
                             unit="candidate"):
        score = readout_score(extraction.select(layers=[layer], pooling=pools).features, scores[:, cols], seed=seed) \
            if len(candidates) > 1 else float("nan")
        table.append({"layer": layer, "pooling": "+".join(pools), "cv_auroc": score})
    best = max(table, key=lambda row: np.nan_to_num(row["cv_auroc"], nan=-1.0))
    return (best["layer"],), tuple(best["pooling"].split("+")), table


def train_router(outcomes: Outcomes, pool: ModelPool, extractor: ActivationExtractor | None = None, *,
                 layers: Sequence[Any] | None = None, pooling: str | Sequence[str] | None = None,
                 policy: str = "utility", cv: int = 5, n_components: int | None = None,
                 max_accuracy_drop: float = 0.01, seed: int = 0, progress: bool = True,
                 families: Sequence[str] = FAMILIES, keep_models: Sequence[str] = ()) -> DifficultyRouter:
    """Train per-model success probes on ``outcomes`` and return a router ready to ``route``.

    With ``layers``/``pooling`` left as None the read-out is chosen by cross-validated AUROC
    over middle layers and the three poolings. The default operating point is the cheapest
    setting, on out-of-fold predictions, within ``max_accuracy_drop`` of the best single model.

    ``families`` are the predictors of success compared by cross-validated routing quality
    on the same folds (APGR for two models, frontier AUC otherwise): ``activation`` (the
    read-out probe), ``lexical`` (tf-idf n-grams) and ``stacked`` (both plus prompt length).
    The best is kept and the table goes into ``router.info["families"]``.

    Models another pool model beats on both training accuracy and mean cost are dropped from
    routing (kept as a last resort) unless named in ``keep_models``. The utility policy's
    margin is fitted on out-of-fold predictions (:func:`~difficulty_router.policies.fit_margin`).
    """
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
    if layers is not None and pooling is not None:  # a fixed read-out: every given layer, concatenated
        extraction = extractor.extract(outcomes.queries, layers=candidate_layers, pooling=pooling, progress=progress)
        chosen_layers, chosen_pooling, sweep_table = extraction.layers, extraction.pooling, []
    else:  # sweep one layer at a time, with the given pooling or all three
        poolings = READOUT_POOLINGS if pooling is None else (normalise_pooling(pooling),)
        extraction = extractor.extract(outcomes.queries, layers=candidate_layers, pooling="both", progress=progress)
        chosen_layers, chosen_pooling, sweep_table = select_readout(extraction, outcomes.scores, poolings, seed, progress)
        extraction = extraction.select(layers=chosen_layers, pooling=chosen_pooling)
    texts = [conversation_text(c) for c in outcomes.queries]
    costs = pool.costs([len(t) for t in texts])
    capability = outcomes.scores.mean(axis=0)
    fit = fit_families(extraction.features, texts, outcomes.scores, costs, capability, families=families, cv=cv,
                       n_components=n_components, seed=seed, progress=progress, names=pool.names)
    probe, family = fit.probe, fit.family
    difficulty_probe = None
    if outcomes.difficulty is not None and (outcomes.difficulty > 0).sum() >= 20:
        labelled = outcomes.difficulty > 0
        difficulty_probe = DifficultyProbe().fit(extraction.features[labelled], outcomes.difficulty[labelled])
    realised = realised_costs(outcomes, costs)
    dropped = dominated(capability, realised.mean(axis=0), pool.names, keep=tuple(keep_models))
    router = DifficultyRouter(extractor, pool, probe, layers=chosen_layers, pooling=chosen_pooling,
                              capability=capability, policy=Policy(policy), difficulty_probe=difficulty_probe,
                              family=family, lexical=fit.lexical if family != "activation" else None,
                              stack=fit.stack if family == "stacked" else None, dropped=dropped,
                              novelty=NoveltyScore(seed=seed).fit(extraction.features))
    # Default operating point and a policy comparison, on out-of-fold probabilities: rows the probes did not fit.
    oof = fit.oof[family]
    eligible = router.eligibility(len(outcomes), None)
    margin, margin_table = fit_margin(oof, outcomes.scores, costs, capability, eligible)
    comparison = {}
    for kind in ("utility", "threshold"):
        points = sweep(Policy(kind, margin=margin if kind == "utility" else 0.0), oof, costs, capability,
                       outcomes.scores, realised, eligible)
        target = float(capability.max()) - max_accuracy_drop
        try:
            point = pick_operating_point(points, Policy(kind).parameter, target_accuracy=target)
        except ValueError:
            point = max(points, key=lambda p: (p["accuracy"], -p["cost"]))
        comparison[kind] = {"point": point}
    if len(pool) == 2:
        weak, strong = np.argsort(capability)
        comparison["utility"].update(apgr_cpt(oof[:, strong] - oof[:, weak], outcomes.scores[:, weak], outcomes.scores[:, strong], seed))
        comparison["threshold"].update(apgr_cpt(1 - oof[:, weak], outcomes.scores[:, weak], outcomes.scores[:, strong], seed))
    router.policy = Policy.from_point(policy, comparison[policy]["point"])
    router.info = {
        "training": outcomes.summary(),
        "readout_sweep": sweep_table,
        "readout": {"layers": list(chosen_layers), "pooling": list(chosen_pooling)},
        "family": family,
        "families": fit.table,
        "lexical_candidates": fit.lexical.candidate_scores_ if fit.lexical is not None else [],
        "cv_auroc": {m: float(a) for m, a in zip(pool.names, probe.cv_auroc_)},
        "regularisation_C": {m: float(c) for m, c in zip(pool.names, probe.C_)},
        "out_of_fold_policies": comparison,
        "dropped_models": dropped,
        "utility_margin": {"margin": margin, "candidates": margin_table},
        "default_operating_point": {"max_accuracy_drop": max_accuracy_drop, **comparison[policy]["point"]},
        "truncated_prompts": int(extraction.truncated.sum()),
        "seed": seed,
    }
    router.family_fit_ = fit  # every family's probes and out-of-fold predictions, for diagnostics; not saved
    return router
