"""An append-only log of routing decisions, one JSON object a line (JSON Lines).

One line per routed call (shadow mode or not): its ``query_id`` (a fresh random id, also in the
call's record and the server's ``x-router-query-id`` header, so the application can attach a
grade or a thumbs up to it), what the router chose, its probabilities and predicted cost, which
model actually served, and ``features_key``: what the read-out was computed with and the exact
feature-cache key of this query's read-out (``row_key``). ``difficulty-router report LOG`` says
what routing would have saved; ``difficulty-router feedback LOG`` joins grades to it for
retraining. Prompts are never stored, only their SHA-256 (a log must be safe to hand to whoever
reads the report); training needs the text again, from the grades or a prompts file (see
:mod:`.feedback`).

Appends are thread-safe (one lock per log; each line is written and flushed whole, so a reader
never sees half a line). The log rotates only when ``max_bytes`` is given: the full file becomes
``PATH.1`` (``PATH.1`` becomes ``PATH.2`` ... up to ``backups``; the oldest is deleted).
:func:`read_log` reads the rotated files oldest first, then ``PATH``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from difficulty_router.data.jsonl import read_jsonl
from difficulty_router.data.queries import conversation_text, to_conversations

FIELDS = (
    "ts",
    "query_id",
    "prompt_sha256",
    "chosen",
    "served_by",
    "probabilities",
    "predicted_cost",
    "features_key",
    "session",
    "shadow",
    "transfer",
)


def prompt_sha256(query: Any) -> str:
    """SHA-256 of the query as the router reads it (a string or a chat conversation)."""
    return hashlib.sha256(conversation_text(to_conversations([query])[0]).encode("utf-8")).hexdigest()


def features_key(router: Any, query: Any = None) -> dict | None:
    """What the read-out was computed with (extractor weights, layers, pooling) and, given the query,
    ``row_key``: the feature cache's key for this query's read-out
    (:meth:`~difficulty_router.extraction.feature_cache.FeatureCache.row_key` of the exact token ids), the row a
    router loaded with ``feature_cache=`` stored while routing and ``train --update`` reads back."""
    extractor = getattr(router, "extractor", None)
    if extractor is None:
        return None
    layers, pooling = list(getattr(router, "layers", ())), list(getattr(router, "pooling", ()))
    key = {
        "extractor_sha256": str(getattr(extractor, "model_hash", ""))[:16],
        "layers": layers,
        "pooling": pooling,
    }
    cache_key = getattr(extractor, "_cache_key", None)
    if query is not None and isinstance(cache_key, str) and callable(getattr(extractor, "tokenize", None)):
        from difficulty_router.extraction.feature_cache import FeatureCache

        ids, _ = extractor.tokenize(to_conversations([query]))
        key["row_key"] = FeatureCache.row_key(cache_key, layers, pooling, ids[0])
    return key


class DecisionLog:
    """Appends decision records to ``path`` (JSON Lines); see the module docstring for rotation."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_bytes: int | None = None,
        backups: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"decision log path {self.path} is a directory; give a file name")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive integer or None (never rotate), got {max_bytes!r}")
        if isinstance(backups, bool) or not isinstance(backups, int) or backups < 1:
            raise ValueError(f"backups must be an integer >= 1, got {backups!r}")
        self.max_bytes, self.backups, self.clock = max_bytes, backups, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, entry: Mapping[str, Any]) -> dict:
        """Write one record (the :data:`FIELDS`; ``ts`` defaults to now). Returns what was written."""
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise ValueError(f"decision log entries take only {list(FIELDS)}; got unknown keys {unknown}")
        record = {name: entry.get(name) for name in FIELDS}
        if record["ts"] is None:
            record["ts"] = float(self.clock())
        line = json.dumps(record, allow_nan=False, separators=(",", ":"), default=_plain) + "\n"
        self.write_line(line.encode("utf-8"))
        return record

    def write_line(self, data: bytes) -> None:
        """Append one whole encoded line, rotating first when it would pass ``max_bytes``. Apart from
        :meth:`append` so that a log shared by processes (``scale.ray_decision_log``) builds each line where
        the decision was made and only this step runs in the one writer."""
        with self._lock:
            if (
                self.max_bytes is not None
                and self.path.exists()
                and self.path.stat().st_size + len(data) > self.max_bytes
            ):
                self._rotate()
            with open(self.path, "ab") as handle:
                handle.write(data)
                handle.flush()

    def log_call(
        self,
        query: Any,
        decision: Any,
        *,
        served_by: str | None = None,
        shadow: Mapping[str, Any] | None = None,
        query_id: str | None = None,
        router: Any = None,
    ) -> dict:
        """The record of one routed call: the router's ``decision`` for ``query`` (None: no prompt hash) and
        the model that served. ``chosen`` is the decision's model (after a session policy, if any; the
        session's ``per_call_choice`` says what the router alone chose)."""
        return self.append(
            {
                "query_id": query_id,
                "prompt_sha256": prompt_sha256(query) if query is not None else None,
                "chosen": decision.model,
                "served_by": served_by,
                "probabilities": dict(decision.probabilities),
                "predicted_cost": {"chosen": float(decision.expected_cost), "per_model": dict(decision.costs)},
                "features_key": features_key(router, query),
                "session": getattr(decision, "session", None),
                "shadow": dict(shadow) if shadow is not None else None,
                # the transfer guard's verdict (zero-label routers built with one), else None
                "transfer": getattr(decision, "transfer", None),
            }
        )

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def read_log(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a log, rotated files first (oldest first); a malformed line is an error naming it."""
    path = Path(path)
    rotated = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    files = [*rotated, path] if path.exists() else rotated
    if not files:
        raise FileNotFoundError(f"decision log not found: {path}")
    for file in files:
        for number, record in read_jsonl(file, objects_only=False, line_name="{path}:{number}"):
            if not isinstance(record, dict) or "chosen" not in record:
                raise ValueError(f"{file}:{number}: not a decision record (no 'chosen')")
            yield record


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    raise TypeError(f"cannot write {type(value).__name__} to a decision log")
