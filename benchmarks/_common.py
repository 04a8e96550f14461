"""Paths and small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The team kit beside the checkout; override with DIFFICULTY_ROUTER_DATA.
DATA = Path(os.environ.get("DIFFICULTY_ROUTER_DATA", REPO.parent / "shared" / "data"))


def need_data(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        raise SystemExit(f"{path} not found: benchmarks read the routing data in ../shared/data "
                         f"(or set DIFFICULTY_ROUTER_DATA)")
    return path


def routellm_clean(limit: int, seed: int):
    """RouteLLM MMLU without the contaminated rows, then a seeded subset of ``limit`` rows (0 = all).

    Returns (outcomes, number of clean rows, number of contaminated rows dropped); the ablation
    and the main RouteLLM benchmark must see the same rows so the feature cache serves both.
    """
    import gzip

    import numpy as np

    from difficulty_router import load_outcomes

    path = need_data("routellm_mmlu/outcomes.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        contaminated = {row["id"] for row in map(json.loads, fh) if row.get("contaminated")}
    outcomes = load_outcomes(path)
    outcomes = outcomes.subset([i for i, q in enumerate(outcomes.ids) if q not in contaminated])
    n_clean = len(outcomes)
    if limit and limit < len(outcomes):
        outcomes = outcomes.subset(np.sort(np.random.default_rng(seed).choice(len(outcomes), limit, replace=False)))
    return outcomes, n_clean, len(contaminated)


def machine() -> str:
    from difficulty_router.extraction.numerics import cpu_model_name

    cpu = cpu_model_name()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def write_results(name: str, markdown: str, payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    print(markdown)
    print(f"wrote {RESULTS / (name + '.md')} and .json")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def extract_cached(extractor_id: str, max_tokens: int, queries, layers, progress: bool = True):
    """(extractor, features of every query at ``layers`` with both poolings, seconds): through the shared
    feature cache, so benchmarks that read the same rows extract them once."""
    import time

    from difficulty_router import ActivationExtractor, FeatureCache, cache_root

    layers = [int(x) if float(x).is_integer() else x for x in layers]
    extractor = ActivationExtractor(extractor_id, max_tokens=max_tokens, feature_cache=FeatureCache(cache_root() / "features"))
    start = time.perf_counter()
    features = extractor.extract(queries, layers=layers, pooling="both", progress=progress)
    return extractor, features, time.perf_counter() - start
