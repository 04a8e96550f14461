"""A disk memo of extracted read-outs, so re-training or evaluating on the same data skips the forward passes.

Each (layer, pooling) block of a query is its own ``.npy`` file, keyed by the extractor's
weight hash and the exact token ids (which already encode chat template and truncation);
a later call that asks for any subset of cached layers and poolings is served from disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class FeatureCache:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _key(model_hash: str, layer: int, pooling: str, token_ids: Sequence[int]) -> str:
        digest = hashlib.sha256(f"{model_hash}|{layer}|{pooling}|".encode())
        digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
        return digest.hexdigest()

    @classmethod
    def row_key(cls, model_hash: str, layers: Sequence[int], pooling: Sequence[str], token_ids: Sequence[int]) -> str:
        """One key for a whole row (every requested block), derived from the per-block keys above: what the
        Parquet shards of distributed extraction (``scale.ray_extract``) are keyed by, so a shard row and
        the cache's blocks name the same content."""
        digest = hashlib.sha256()
        for layer in layers:
            for pool in pooling:
                digest.update(cls._key(model_hash, layer, pool, token_ids).encode())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def load(
        self, model_hash: str, layers: Sequence[int], pooling: Sequence[str], token_ids: Sequence[int], hidden_size: int
    ) -> np.ndarray | None:
        """The concatenated row, or None unless every block is cached."""
        blocks = []
        for layer in layers:
            for pool in pooling:
                path = self._path(self._key(model_hash, layer, pool, token_ids))
                if not path.is_file():
                    return None
                block = np.load(path, allow_pickle=False)
                if block.shape != (hidden_size,):
                    return None
                blocks.append(block)
        return np.concatenate(blocks)

    def store(
        self,
        model_hash: str,
        layers: Sequence[int],
        pooling: Sequence[str],
        token_ids: Sequence[int],
        row: np.ndarray,
        hidden_size: int,
    ) -> None:
        row = np.asarray(row, dtype=np.float32)
        index = 0
        for layer in layers:
            for pool in pooling:
                path = self._path(self._key(model_hash, layer, pool, token_ids))
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, row[index * hidden_size : (index + 1) * hidden_size], allow_pickle=False)
                os.replace(tmp, path)
                index += 1
