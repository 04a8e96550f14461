"""What a read-out is: which hidden states (layers), how each is pooled over the prompt, and the features they give.

The extractor, the trainer, the router and local generation all name read-outs the same way, and a
saved router records one; the specs are checked and normalised here once. :class:`Extraction` is the
plain result (one feature row per query, its blocks in a fixed order) that everything above reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

POOLINGS = ("last", "mean")


def normalise_pooling(pooling: str | Sequence[str]) -> tuple[str, ...]:
    """'last', 'mean', 'both' or a sequence of them -> an ordered tuple without repeats."""
    names = [pooling] if isinstance(pooling, str) else list(pooling)
    out: list[str] = []
    for name in names:
        if name == "both":
            out.extend(POOLINGS)
        elif name in POOLINGS:
            out.append(name)
        else:
            raise ValueError(f"unknown pooling {name!r}; expected 'last', 'mean' or 'both'")
    if not out:
        raise ValueError("pooling is empty; expected 'last', 'mean' or 'both'")
    return tuple(dict.fromkeys(out))


def normalise_layers(layers: Any, n_layers: int) -> tuple[int, ...]:
    """Map layer specs to hidden-state indexes 0..n_layers.

    Ints index ``hidden_states`` (negative from the end, so -1 is the last); floats in
    (0, 1) are fractions of the depth (0.5 -> the middle block).
    """
    specs = [layers] if isinstance(layers, (int, float, np.integer, np.floating)) else list(layers)
    if not specs:
        raise ValueError("layers is empty")
    out: list[int] = []
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, (int, float, np.integer, np.floating)):
            raise ValueError(f"layer {spec!r} is not an int index or a float fraction")
        if isinstance(spec, (float, np.floating)) and not float(spec).is_integer():
            if not 0.0 < spec < 1.0:
                raise ValueError(f"layer fraction {spec} must lie strictly between 0 and 1")
            index = round(spec * n_layers)
        else:
            index = int(spec)
            if index < 0:
                index += n_layers + 1
        if not 0 <= index <= n_layers:
            raise ValueError(
                f"layer {spec} is out of range: this model has hidden states 0..{n_layers} (or -{n_layers + 1}..-1)"
            )
        out.append(index)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Extraction:
    """Features of a batch of queries and the read-out that produced them.

    ``features`` has one row per query and, for each layer in ``layers``, one
    ``hidden_size`` block per pooling in ``pooling``, in that nesting order.
    """

    features: np.ndarray
    layers: tuple[int, ...]
    pooling: tuple[str, ...]
    hidden_size: int
    n_tokens: np.ndarray
    truncated: np.ndarray
    model_id: str = ""
    model_hash: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.features.shape

    def __len__(self) -> int:
        return len(self.features)

    def __array__(self, dtype=None, copy=None):
        return self.features if dtype is None else self.features.astype(dtype)

    @property
    def any_truncated(self) -> bool:
        return bool(self.truncated.any())

    def select(
        self, layers: Sequence[int] | int | None = None, pooling: str | Sequence[str] | None = None
    ) -> Extraction:
        """Slice out some of the extracted layers/poolings without another forward pass."""
        layers = (
            self.layers if layers is None else ((layers,) if isinstance(layers, (int, np.integer)) else tuple(layers))
        )
        pooling = self.pooling if pooling is None else normalise_pooling(pooling)
        blocks = []
        for layer in layers:
            if layer not in self.layers:
                raise ValueError(f"layer {layer} was not extracted (have {self.layers})")
            for pool in pooling:
                if pool not in self.pooling:
                    raise ValueError(f"pooling {pool!r} was not extracted (have {self.pooling})")
                block = self.layers.index(layer) * len(self.pooling) + self.pooling.index(pool)
                blocks.append(self.features[:, block * self.hidden_size : (block + 1) * self.hidden_size])
        return Extraction(
            features=np.ascontiguousarray(np.concatenate(blocks, axis=1)),
            layers=tuple(layers),
            pooling=tuple(pooling),
            hidden_size=self.hidden_size,
            n_tokens=self.n_tokens,
            truncated=self.truncated,
            model_id=self.model_id,
            model_hash=self.model_hash,
        )


def relative_block_error(a: np.ndarray, b: np.ndarray, hidden_size: int) -> np.ndarray:
    """Per row and per ``hidden_size`` block: ``|a - b| / |b|`` (the measure ``FEATURE_RTOL`` bounds)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1, hidden_size)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1, hidden_size)
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
