"""A disk memo of extracted rows, so re-training on the same data skips the forward passes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


class FeatureCache:
    """One ``.npy`` per (model hash, layers, pooling, token ids); token ids already encode template and truncation."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(model_hash: str, layers, pooling, token_ids) -> str:
        digest = hashlib.sha256()
        digest.update(f"{model_hash}|{tuple(layers)}|{tuple(pooling)}|".encode())
        digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, key: str, width: int) -> np.ndarray | None:
        path = self._path(key)
        if not path.is_file():
            return None
        row = np.load(path, allow_pickle=False)
        return row if row.shape == (width,) else None

    def put(self, key: str, row: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, np.asarray(row, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, path)
