"""Feature shards: Parquet files of extracted rows keyed by content, and the manifest that commits them.

A shard row is ``key`` (:meth:`FeatureCache.row_key` of the extractor's cache key, the read-out and the
prompt's token ids: the same content hash the feature cache files blocks under), ``n_tokens``,
``truncated`` and ``features`` (float32, fixed width). A shard's file name is a hash of its keys, written
to a temporary name and renamed, so a retried batch rewrites the same file instead of adding one. Only
the shards listed in ``features.json`` (written last, by the driver, from the outputs of tasks that
succeeded) belong to the result: a shard left by a killed attempt is not listed and is removed.

Readers stream: :meth:`FeatureShards.iter_batches` yields bounded batches and :meth:`FeatureShards.lookup`
keeps only the rows asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "features.json"
FORMAT = "difficulty-router-features/1"


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("feature shards need pyarrow: pip install 'difficulty-router[ray]'") from None
    return pa, pq


def shard_name(keys: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
    return f"part-{digest.hexdigest()[:24]}.parquet"


def write_shard(directory: str | os.PathLike, keys: Sequence[str], features: np.ndarray, n_tokens, truncated) -> str:
    """Write one shard atomically under a name fixed by its keys; returns the name. Idempotent."""
    pa, pq = _pa()
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(keys):
        raise ValueError(f"{len(keys)} keys but features of shape {features.shape}")
    width = features.shape[1]
    table = pa.table(
        {
            "key": pa.array(list(keys), pa.string()),
            "n_tokens": pa.array(np.asarray(n_tokens, dtype=np.int32)),
            "truncated": pa.array(np.asarray(truncated, dtype=bool)),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), width),
        }
    )
    directory = Path(directory)
    name = shard_name(keys)
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, directory / name)
    return name


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=1))
    os.replace(tmp, path)
    return path


class FeatureShards:
    """A committed set of feature shards (a directory with ``features.json``), read without loading it whole."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise ValueError(f"{self.directory} holds no {MANIFEST}: not a finished feature-shard directory")
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        missing = [s for s in self.manifest["shards"] if not (self.directory / s).is_file()]
        if missing:
            raise ValueError(f"{path} lists {len(missing)} shards that are missing, e.g. {missing[0]}")

    @property
    def shards(self) -> list[Path]:
        return [self.directory / s for s in self.manifest["shards"]]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def width(self) -> int:
        return int(self.manifest["width"])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["layers"])

    @property
    def pooling(self) -> tuple[str, ...]:
        return tuple(self.manifest["pooling"])

    @property
    def cache_key(self) -> str:
        return str(self.manifest["cache_key"])

    def iter_batches(self, batch_rows: int = 8192) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]]:
        """``(keys, features float32 (b, width), n_tokens, truncated)`` batches of at most ``batch_rows`` rows."""
        _pa_mod, pq = _pa()
        for path in self.shards:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                feats = batch.column("features")
                values = feats.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                yield (
                    batch.column("key").to_pylist(),
                    values.reshape(len(batch), self.width),
                    batch.column("n_tokens").to_numpy(),
                    batch.column("truncated").to_numpy(zero_copy_only=False),
                )

    def keys(self) -> list[str]:
        """Every row's key, in shard order (duplicates included, if the input repeated a prompt)."""
        _pa_mod, pq = _pa()
        out: list[str] = []
        for path in self.shards:
            out.extend(pq.read_table(path, columns=["key"]).column("key").to_pylist())
        return out

    def lookup(self, keys: Sequence[str], batch_rows: int = 8192) -> np.ndarray:
        """Rows for ``keys`` in that order (float32); streams the shards and keeps only the rows asked for."""
        wanted: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            wanted.setdefault(key, []).append(i)
        out = np.empty((len(keys), self.width), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        for batch_keys, feats, _n, _t in self.iter_batches(batch_rows):
            for row, key in enumerate(batch_keys):
                positions = wanted.get(key)
                if positions is not None:
                    out[positions] = feats[row]
                    found[positions] = True
        if not found.all():
            raise ValueError(
                f"{int((~found).sum())} of {len(keys)} rows are not in the shards at {self.directory} "
                "(extracted with another model, read-out or max_tokens, or not extracted yet)"
            )
        return out
