"""``train --update``: refit a saved router from the labels it was trained on plus new ones.

Where the old labels come from: a router trained by ``difficulty-router train`` (or updated
here) records its training files in ``info["training"]["sources"]``: absolute path, SHA-256,
and the ``--limit``/``--seed`` subset taken. An update reads them back and refuses a file whose
hash changed (it would not be the data the router learnt from); a router without that record
(trained before it existed, or through the Python API) or whose files moved needs the old labels
passed explicitly (``old_data=`` / ``--old-data``). Nothing is copied into the bundle: labels
can be large and private, and the manifest stays the same format.

What is refitted: the probes, families, operating point and novelty score, on the old rows plus
the new, at the old router's read-out (layers and pooling: no new sweep) with its policy kind,
compared families and seed, so the extractor reads only rows the feature cache lacks. Old rows
were cached when the router was trained with a feature cache (the CLI's default); new rows are
extracted once (while filling missing labels, below) and then served from the cache.

New rows may label only some pool models (``difficulty-router feedback`` rows label the model
that served). A missing label is filled with the OLD router's calibrated P(success) for that
model on that prompt, as a soft label: it carries no new information and keeps that model's
probe where it was on those rows, while the observed labels move it. The manifest's
``info["update"]`` records the row counts (old, new), how many labels were observed and how many
filled, and the sources.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.data.jsonl import read_jsonl
from difficulty_router.data.outcomes import Outcomes, parse_outcome_rows
from difficulty_router.learning.bundle import sha256_file
from difficulty_router.learning.families import FAMILIES


def data_source(path: str | os.PathLike, limit: int | None = None, seed: int = 0) -> dict:
    """What ``info["training"]["sources"]`` records of one training file."""
    path = Path(path).resolve()
    return {"path": str(path), "sha256": sha256_file(path), "limit": limit, "seed": seed}


def read_label_rows(path: str | os.PathLike, models: list[str]) -> Outcomes:
    """An outcomes file whose rows may label any subset of ``models`` (missing labels are NaN).

    The same row format and checks as :func:`~difficulty_router.data.outcomes.load_outcomes` (``prompt``/
    ``messages``, ``correct`` or ``scores``, optional ``id``, ``difficulty``, ``cost``), through the same
    parser; a model outside the pool is an error naming the line, as is a row that labels none.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    return parse_outcome_rows(read_jsonl(path), source=str(path), models=models)


def _subset(outcomes: Outcomes, limit: int | None, seed: int) -> Outcomes:
    """The seeded subset ``train --limit`` took (the same draw as the CLI's)."""
    if limit and limit < len(outcomes):
        keep = np.sort(np.random.default_rng(seed).choice(len(outcomes), limit, replace=False))
        return outcomes.subset(keep)
    return outcomes


def old_sources(router, old_data: list[str | os.PathLike] | None) -> list[dict]:
    """The old router's training files: given ones, or the recorded ones with their hashes checked."""
    if old_data:
        return [data_source(p) for p in old_data]
    sources = (router.info.get("training") or {}).get("sources")
    if not sources:
        raise ValueError(
            "this router does not record its training files (trained before train recorded them, or through "
            "the Python API): pass the labels it was trained on with --old-data (old_data=)"
        )
    for source in sources:
        path = Path(source["path"])
        if not path.is_file():
            raise ValueError(f"the old router's training file {path} is gone; pass it with --old-data (old_data=)")
        if sha256_file(path) != source["sha256"]:
            raise ValueError(
                f"the old router's training file {path} changed since it was trained (SHA-256 differs); "
                "pass the labels it was trained on with --old-data (old_data=)"
            )
    return [dict(s) for s in sources]


def _stack(parts: list[Outcomes], models: list[str]) -> Outcomes:
    difficulty = [p.difficulty if p.difficulty is not None else np.zeros(len(p), np.int64) for p in parts]
    cost = [p.cost if p.cost is not None else np.full((len(p), len(models)), np.nan) for p in parts]
    any_cost = any(p.cost is not None for p in parts)
    stacked_difficulty = np.concatenate(difficulty)
    return Outcomes(
        queries=[q for p in parts for q in p.queries],
        models=list(models),
        scores=np.vstack([p.scores for p in parts]),
        ids=[i for p in parts for i in p.ids],
        difficulty=stacked_difficulty if stacked_difficulty.any() else None,
        cost=np.vstack(cost) if any_cost else None,
    )


def update_router(
    old,
    new_data: str | os.PathLike | list[str | os.PathLike],
    *,
    old_data: list[str | os.PathLike] | None = None,
    cv: int = 5,
    progress: bool = True,
):
    """A router refitted on ``old``'s training rows plus ``new_data`` (see the module docstring).

    ``old``: a loaded :class:`~difficulty_router.DifficultyRouter` (load it with ``feature_cache=`` so
    cached read-outs are reused). Returns the new router; ``old`` is not modified.
    """
    from difficulty_router.training.train import train_router

    models = list(old.models)
    new_paths = [new_data] if isinstance(new_data, (str, os.PathLike)) else list(new_data)
    if not new_paths:
        raise ValueError("give at least one file of new labels")
    sources = old_sources(old, old_data)
    old_rows = _stack(
        [_subset(read_label_rows(s["path"], models), s.get("limit"), s.get("seed", 0)) for s in sources], models
    )
    new_rows = _stack([read_label_rows(p, models) for p in new_paths], models)
    merged = _stack([old_rows, new_rows], models)
    missing = np.isnan(merged.scores)
    filled = int(missing.sum())
    if filled:  # the old router's belief for labels nobody observed (reads and caches the new rows' read-outs)
        rows = np.flatnonzero(missing.any(axis=1))
        proba = old.predict_proba([merged.queries[i] for i in rows], progress=progress)
        merged.scores[rows] = np.where(missing[rows], proba, merged.scores[rows])
    info = old.info or {}
    compared = [r["family"] for r in info.get("families") or [] if r.get("family") in FAMILIES]
    router = train_router(
        merged,
        old.pool,
        old.extractor,
        layers=list(old.layers),
        pooling=tuple(old.pooling),
        policy=old.policy.kind,
        cv=cv,
        seed=int(info.get("seed", 0)),
        progress=progress,
        families=compared or FAMILIES,
    )
    new_sources = [*sources, *(data_source(p) for p in new_paths)]
    router.info["training"]["sources"] = new_sources
    router.info["update"] = {
        "old_rows": len(old_rows),
        "new_rows": len(new_rows),
        "new_labels_observed": int((~np.isnan(new_rows.scores)).sum()),
        "labels_filled_from_old_router": filled,
        "old_sources": sources,
        "new_sources": new_sources[len(sources) :],
        "previous_update": info.get("update"),
    }
    return router


def record_training_source(router, path: str | os.PathLike, limit: int | None, seed: int) -> None:
    """Note in the manifest which file (and subset) a router was trained on, so ``train --update`` finds it."""
    router.info.setdefault("training", {})["sources"] = [data_source(path, limit, seed)]


def describe_update(router) -> str:
    u: dict[str, Any] = router.info["update"]
    return (
        f"updated from {u['old_rows']} old rows + {u['new_rows']} new rows ({u['new_labels_observed']} new labels "
        f"observed, {u['labels_filled_from_old_router']} missing labels filled with the old router's P(success))"
    )
