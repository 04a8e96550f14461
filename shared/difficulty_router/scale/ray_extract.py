"""Distributed extraction: Ray Data reads the prompts, a pool of actors (one extractor model each) runs the
forward passes, and every batch becomes one content-keyed Parquet shard (see ``shards``).

Exactly once, without coordination: Ray Data restarts a dead actor and retries its batch (its defaults
for actor pools), a retried batch rewrites the shard of the same name, and the driver's manifest lists
only the shards returned by batches that finished. The workers read and write the same
:class:`FeatureCache` as single-process extraction, so rows either one extracted before are not run again.

No free CPUs: before reading anything the driver checks that the cluster can reserve ``workers`` workers'
CPUs (a placement group, released at once: the read tasks need CPUs too), and once the input is read it
reserves them again and starts the actor pool inside that group, with Ray Data's ``wait_for_min_actors_s``
as a backstop. Each wait lasts at most ``worker_start_timeout_s``, after which the job fails with
:class:`~difficulty_router.scale.WorkersNotPlacedError`; removing the group at the end stops the pool's
actors however the job ended. The extractor loads on a worker's first batch, not in its constructor, so the
pool's wait measures placement, not how long a model takes to load.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.data.queries import QUERY_FIELDS, query_from_json_line
from difficulty_router.extraction.feature_cache import FeatureCache
from difficulty_router.extraction.model_store import DEFAULT_MODEL
from difficulty_router.scale.cluster import (
    DEFAULT_WORKER_START_TIMEOUT_S,
    WorkersNotPlacedError,
    check_timeout,
    ensure_ray,
    reserve_workers,
)
from difficulty_router.scale.shards import MANIFEST, FeatureShards, write_manifest, write_shard

TEXT_SUFFIXES = (".jsonl", ".json", ".txt")


def _input_kind(paths: Sequence[Path]) -> str:
    suffixes = {p.suffix for p in paths}
    if len(suffixes) != 1:
        raise ValueError(f"input files must all be JSON Lines, .txt or Parquet, got suffixes {sorted(suffixes)}")
    suffix = suffixes.pop()
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "txt" if suffix == ".txt" else "jsonl"
    raise ValueError(f"unsupported input {paths[0]}: expected .jsonl, .json, .txt or .parquet")


def _query(value: Any, kind: str) -> Any:
    if kind == "jsonl":
        return query_from_json_line(value, f"JSON Lines row {value[:60]!r}")
    if kind == "txt":
        return value
    return value  # a Parquet cell: a string, or a list of {role, content} structs


class ExtractorWorker:
    """One extractor model per actor; ``__call__`` turns a batch of prompts into one shard and reports it. The
    model loads on the first batch: the constructor returns at once, so the pool's start-up wait
    (``wait_for_min_actors_s``) measures whether the actor could be placed, not the model's load time."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self._extractor: Any = None

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = self._load(self.config)
        return self._extractor

    @staticmethod
    def _load(config: dict):
        from difficulty_router.extraction.extractor import ActivationExtractor
        from difficulty_router.extraction.framework_forward import pick_device
        from difficulty_router.extraction.numerics import one_path_for_many_processes

        return ActivationExtractor(
            config["model"],
            gguf_file=config["gguf_file"],
            layers=config["layers"],
            pooling=config["pooling"],
            device=config["device"],
            dtype=one_path_for_many_processes(config["dtype"], pick_device(config["device"])),
            max_tokens=config["max_tokens"],
            batch_size=config["batch_size"],
            threads=config["threads"],
            feature_cache=config["feature_cache"],
        )

    def __call__(self, batch) -> dict[str, np.ndarray]:
        ex = self.extractor
        column = self.config["column"]
        queries = [_query(v, self.config["kind"]) for v in batch.column(column).to_pylist()]
        ids, _ = ex.tokenize(queries)
        keys = [FeatureCache.row_key(ex._cache_key, ex.layers, ex.pooling, x) for x in ids]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # a prompt repeated in the batch: once
        keep = sorted(first.values())
        result = ex.extract([queries[i] for i in keep], progress=False)
        name = write_shard(
            self.config["output"], [keys[i] for i in keep], result.features, result.n_tokens, result.truncated
        )
        return {
            "shard": np.array([name]),
            "rows": np.array([len(keep)]),
            "repeats": np.array([len(keys) - len(keep)]),
            "readout": np.array(
                [
                    json.dumps(
                        {
                            "model_id": ex.model_id,
                            "model_hash": ex.model_hash,
                            "cache_key": ex._cache_key,
                            "layers": list(ex.layers),
                            "pooling": list(ex.pooling),
                            "hidden_size": ex.hidden_size,
                            "max_tokens": ex.max_tokens,
                            "dtype": str(ex.dtype).split(".")[-1],
                            "device": ex.device.type,
                        }
                    )
                ]
            ),
        }


def _run_pool(ray, ds, config: dict, rows_per_shard: int, workers: int, cpus: int, gpus: int, timeout_s: float, group):
    """The actor pool over ``ds``, its actors in the placement group ``group``: its results, or None when its
    actors were not all running after ``timeout_s``. Ray Data's own bound on the pool's start (by default
    none: the pool waits for its actors for ever) is set on this dataset's context only, so other datasets of
    the process keep theirs."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    mapped = ds.map_batches(
        ExtractorWorker,
        fn_constructor_kwargs={"config": config},
        batch_size=rows_per_shard,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group),
    )
    mapped.context.wait_for_min_actors_s = timeout_s
    try:
        return mapped.take_all()
    except ray.exceptions.GetTimeoutError as exc:  # raised by the pool's start when the wait runs out
        if "starting actors" not in str(exc):
            raise
        return None


def _read_dataset(ray, paths: list[Path], kind: str):
    if kind == "parquet":
        ds = ray.data.read_parquet([str(p) for p in paths])
        names = ds.schema().names
        column = next((c for c in QUERY_FIELDS if c in names), None)
        if column is None:
            raise ValueError(f"{paths[0]}: Parquet input needs a column named one of {QUERY_FIELDS}, has {names}")
        return ds.select_columns([column]), column
    return ray.data.read_text([str(p) for p in paths]), "text"


def extract_distributed(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    gguf_file: str | None = None,
    layers: Any = 0.5,
    pooling: str | Sequence[str] = "last",
    max_tokens: int = 2048,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    workers: int | None = None,
    cpus_per_worker: int = 1,
    rows_per_shard: int = 256,
    feature_cache: str | os.PathLike | None = None,
    address: str | None = None,
    progress: bool = False,
    worker_start_timeout_s: float = DEFAULT_WORKER_START_TIMEOUT_S,
) -> FeatureShards:
    """Extract features for every prompt in ``inputs`` (JSON Lines, .txt or Parquet with a
    ``prompt``/``messages``/``query`` column) on a Ray cluster into shards under ``output``.

    ``workers`` actors (default: as many as the cluster's CPUs allow at ``cpus_per_worker`` each) each hold
    one extractor; on a cluster with GPUs each takes one GPU. ``address`` is an existing cluster's address
    (``"auto"`` for one started with ``ray start``); without it a local cluster is started. Returns the
    committed :class:`FeatureShards`; ``features.json`` records the read-out, the row count and the timing.

    ``worker_start_timeout_s``: how long to wait for the cluster to place the workers, once before reading
    (placeholders) and once for the pool; :class:`~difficulty_router.scale.WorkersNotPlacedError` after that.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file not found: {missing[0]}")
    kind = _input_kind(paths)
    if rows_per_shard < 1 or cpus_per_worker < 1:
        raise ValueError("rows_per_shard and cpus_per_worker must be positive")
    timeout_s = check_timeout(worker_start_timeout_s)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    ray = ensure_ray(address)
    from ray.util.placement_group import remove_placement_group

    ray.data.DataContext.get_current().enable_progress_bars = progress
    resources = ray.cluster_resources()
    gpus = 1 if device in ("auto", "cuda") and resources.get("GPU", 0) >= 1 else 0
    if workers is None:
        workers = int(resources.get("GPU", 0)) if gpus else max(1, int(resources.get("CPU", 1)) // cpus_per_worker)
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    cache_dir = Path(feature_cache).expanduser() if feature_cache is not None else None
    config = {
        "model": model,
        "gguf_file": gguf_file,
        "layers": layers,
        "pooling": pooling,
        "device": device,
        "dtype": dtype,
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "threads": cpus_per_worker if not gpus else None,
        "feature_cache": str(cache_dir) if cache_dir is not None else None,
        "output": str(out.resolve()),
        "kind": kind,
    }
    # the read tasks below need CPUs too: with none free they would stall before the pool's own wait began
    remove_placement_group(
        reserve_workers(ray, workers, "extraction", cpus_per_worker, timeout_s, gpus_per_worker=gpus)
    )
    start = time.perf_counter()
    ds, column = _read_dataset(ray, paths, kind)
    config["column"] = column
    # Read and cut into batches before the actors start: an actor pool holding every CPU would otherwise
    # starve the read tasks (a deadlock on a small cluster); the prompts wait in the object store (spilled
    # to disk when large), which is far smaller than the features. ``strict``: every block but the last holds
    # exactly ``rows_per_shard`` rows, so every batch (and shard) does too; best-effort bundling leaves one short
    # block per read block, and 10 rows at 5 a shard came out as 3 shards on a CI machine.
    ds = ds.repartition(target_num_rows_per_block=rows_per_shard, strict=True).materialize()
    # reserved again now that the input is read: the CPUs may have gone to other jobs meanwhile
    group = reserve_workers(ray, workers, "extraction", cpus_per_worker, timeout_s, gpus_per_worker=gpus)
    try:
        results = _run_pool(ray, ds, config, rows_per_shard, workers, cpus_per_worker, gpus, timeout_s, group)
    finally:
        remove_placement_group(group)  # stops the pool's actors, also those of a pool whose start failed
    if results is None:  # reserved, yet not running in time: the worker processes are slow to start
        raise WorkersNotPlacedError(
            f"extraction reserved {workers} workers' CPUs, but its actor pool was not running after {timeout_s:g} s "
            "(the worker processes did not start in that time; see Ray's logs under /tmp/ray/session_latest/logs): "
            "wait longer (--worker-start-timeout) or try again when the machine is less busy"
        )
    elapsed = time.perf_counter() - start
    if not results:
        raise ValueError(f"{paths[0]} holds no prompts")
    readouts = {r["readout"] for r in results}
    if len(readouts) != 1:
        raise ValueError(f"workers disagree on the read-out (different model files on different nodes?): {readouts}")
    readout = json.loads(readouts.pop())
    shards = sorted({r["shard"] for r in results})
    if len(shards) != len(results):
        raise ValueError("two batches produced the same shard name: the input repeats a whole batch of prompts")
    listed = set(shards)
    for stale in out.glob("part-*.parquet"):  # shards of attempts that did not finish, or of an earlier run
        if stale.name not in listed:
            stale.unlink()
    manifest = {
        **readout,
        "width": len(readout["layers"]) * len(readout["pooling"]) * readout["hidden_size"],
        "rows": int(sum(r["rows"] for r in results)),
        "repeated_in_batch": int(sum(r["repeats"] for r in results)),
        "shards": shards,
        "inputs": [str(p) for p in paths],
        "workers": workers,
        "cpus_per_worker": cpus_per_worker,
        "gpus_per_worker": gpus,
        "seconds": round(elapsed, 3),
    }
    write_manifest(out, manifest)
    return FeatureShards(out)


__all__ = ["MANIFEST", "ExtractorWorker", "WorkersNotPlacedError", "extract_distributed"]
