"""Transfer guard: notice on unlabelled traffic that a zero-label difficulty ranking does not transfer, and fall back.

Why it exists: the shipped zero-label head ranks queries by a difficulty fitted on public
tables (MMLU-Pro, LLMRouter). Measured leave-one-domain-out, it ranks some held-out domains
worse than random (``benchmarks/results/zero_label_guard.md``). A new user has no labels to
find that out, so the only evidence is the unlabelled traffic itself: its read-outs and the
head's own scores, compared with what the head saw in training. The guard watches a sliding
window of the most recent queries and computes two statistics, each with a threshold:

* **novelty**: the window's median novelty percentile (:class:`~.novelty.NoveltyScore`,
  calibrated on out-of-fold training scores, so a window of training-like queries has a median
  near 50). Above ``max_median_novelty`` the typical query is further from the training
  read-outs than that share of training queries: the linear head is extrapolating.
* **difficulty shift**: where the window's median difficulty falls among the training
  difficulties (percentile, 0-100). Outside ``difficulty_range`` the head says nearly all of
  the traffic is harder (or easier) than what it was fitted on, which is the same
  extrapolation seen from the score's side.

Once either fires (after at least ``min_queries`` queries), the guard *trips* and stays
tripped until :meth:`TransferGuard.reset` (labels arrived and the router was retrained or
recalibrated): a latch, not a per-window vote, so routing does not flap between the head and
the fallback. While tripped the router sends every query to the safe choice, the most capable
eligible model: the best model's accuracy at its cost, a point on the random-routing line, so
never below it. Before ``min_queries`` the guard says ``warming_up`` and the head routes.

Neither statistic sees a label; they measure shift, not failure. A shifted domain can still
transfer, and the benchmark above reports how often the guard fires on domains where the head
worked, not only on those where it did not.

The guard's configuration and reference (novelty score arrays and training-difficulty
quantiles) save as plain arrays and JSON; its window and latch are runtime state and are not
saved (a reloaded router starts warming up again).
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.learning.bundle import field, load_arrays, read_manifest, write_arrays
from difficulty_router.learning.novelty import NoveltyScore

FORMAT = "difficulty-router/transfer-guard/1"
GUARD_ARRAYS = "transfer_guard.safetensors"
GUARD_MANIFEST = "transfer_guard.json"
#: quantile levels (0..1) at which the training difficulties are stored
DIFFICULTY_LEVELS = np.linspace(0.0, 1.0, 201)
#: the decision states a guard reports
STATES = ("off", "warming_up", "transfers", "fallback")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"transfer_guard.{name} must be a finite number, got {value!r}")
    return float(value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"transfer_guard.{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class GuardPolicy:
    """When the guard trips. Defaults: on; a window of the last 200 queries, judged from the 100th on;
    trips when the window's median novelty percentile exceeds 95, or its median difficulty sits below the
    2.5th or above the 97.5th percentile of the training difficulties. Set ``max_median_novelty`` to 100 or
    ``difficulty_range`` to (0, 100) to switch one statistic off."""

    enabled: bool = True
    window: int = 200
    min_queries: int = 100
    max_median_novelty: float = 95.0
    difficulty_range: tuple[float, float] = (2.5, 97.5)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"transfer_guard.enabled must be true or false, got {self.enabled!r}")
        _count(self.window, "window")
        _count(self.min_queries, "min_queries")
        if self.min_queries > self.window:
            raise ValueError(
                f"transfer_guard.min_queries ({self.min_queries}) cannot exceed the window ({self.window})"
            )
        novelty = _number(self.max_median_novelty, "max_median_novelty")
        if not 0 < novelty <= 100:
            raise ValueError(f"transfer_guard.max_median_novelty must lie in (0, 100], got {novelty}")
        bounds = self.difficulty_range
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"transfer_guard.difficulty_range must be two percentiles (low, high), got {bounds!r}")
        low, high = (_number(b, "difficulty_range") for b in bounds)
        if not 0 <= low < high <= 100:
            raise ValueError(f"transfer_guard.difficulty_range must satisfy 0 <= low < high <= 100, got {bounds!r}")
        object.__setattr__(self, "difficulty_range", (low, high))

    def to_dict(self) -> dict:
        return {
            "enabled": self.enabled,
            "window": self.window,
            "min_queries": self.min_queries,
            "max_median_novelty": float(self.max_median_novelty),
            "difficulty_range": list(self.difficulty_range),
        }

    @classmethod
    def from_dict(cls, data: Any) -> GuardPolicy:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"transfer_guard must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"enabled", "window", "min_queries", "max_median_novelty", "difficulty_range"}
        if unknown:
            raise ValueError(f"transfer_guard has unknown fields {sorted(unknown)}")
        values = dict(data)
        if isinstance(values.get("difficulty_range"), list):
            values["difficulty_range"] = tuple(values["difficulty_range"])
        return cls(**values)


class TransferGuard:
    """A sliding window over recent traffic, compared with the training reference; see the module docstring.

    ``novelty``: a fitted :class:`NoveltyScore` on the training read-outs. ``difficulty_quantiles``: the
    training queries' difficulty at :data:`DIFFICULTY_LEVELS`, on the same scale as the difficulties passed
    to :meth:`observe` (a percentile is unchanged by any increasing map, so the head's scale or the
    router's 1-5 scale both work if used consistently).
    """

    def __init__(
        self, novelty: NoveltyScore, difficulty_quantiles: np.ndarray, policy: GuardPolicy | None = None
    ) -> None:
        if not isinstance(novelty, NoveltyScore) or not hasattr(novelty, "parts_"):
            raise ValueError("the transfer guard needs a fitted NoveltyScore")
        quantiles = np.asarray(difficulty_quantiles, dtype=np.float64)
        if quantiles.shape != DIFFICULTY_LEVELS.shape or not np.isfinite(quantiles).all():
            raise ValueError(f"difficulty_quantiles must hold {len(DIFFICULTY_LEVELS)} finite values")
        if np.any(np.diff(quantiles) < 0):
            raise ValueError("difficulty_quantiles must be non-decreasing")
        self.novelty, self.difficulty_quantiles = novelty, quantiles
        self.policy = policy if policy is not None else GuardPolicy()
        if not isinstance(self.policy, GuardPolicy):
            raise ValueError(f"policy must be a GuardPolicy, got {type(self.policy).__name__}")
        self._lock = threading.Lock()  # a served router routes from several threads; the window is shared state
        self.reset()

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        difficulties: np.ndarray,
        policy: GuardPolicy | None = None,
        *,
        n_components: int = 32,
        seed: int = 0,
    ) -> TransferGuard:
        """The reference from the head's training queries: their read-outs and the head's difficulty of each."""
        features = np.asarray(features, dtype=np.float64)
        difficulties = np.asarray(difficulties, dtype=np.float64)
        if difficulties.ndim != 1 or len(difficulties) != len(features) or not np.isfinite(difficulties).all():
            raise ValueError(
                f"difficulties must be one finite value per training read-out ({len(features)}), "
                f"got shape {difficulties.shape}"
            )
        novelty = NoveltyScore(n_components=n_components, seed=seed).fit(features)
        return cls(novelty, np.quantile(difficulties, DIFFICULTY_LEVELS), policy)

    @property
    def width(self) -> int:
        return int(self.novelty.parts_["mean"].shape[0])

    # -- runtime state -------------------------------------------------------------
    def reset(self) -> None:
        """Forget the window and release the latch (call it once labels have arrived and the router was refitted)."""
        with self._lock:
            self._novelty: deque[float] = deque(maxlen=self.policy.window)
            self._difficulty: deque[float] = deque(maxlen=self.policy.window)
            self.tripped: dict | None = None  # the verdict that tripped the guard, once it has

    @property
    def seen(self) -> int:
        """Queries in the current window."""
        return len(self._novelty)

    def difficulty_percentile(self, difficulties: np.ndarray) -> np.ndarray:
        """Where difficulties fall among the training difficulties, 0-100."""
        return 100.0 * np.interp(
            np.asarray(difficulties, dtype=np.float64),
            self.difficulty_quantiles,
            DIFFICULTY_LEVELS,
            left=0.0,
            right=1.0,
        )

    def observe(self, features: np.ndarray, difficulties: np.ndarray) -> list[dict]:
        """Add a batch of queries in arrival order; one verdict per query, as of that query.

        Each verdict: ``state`` (one of :data:`STATES`), ``fallback`` (route this query to the safe
        choice), ``reason``, and the window statistics it was judged on.
        """
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        difficulties = np.atleast_1d(np.asarray(difficulties, dtype=np.float64))
        if features.shape[1] != self.width or len(difficulties) != len(features):
            raise ValueError(
                f"observe needs (n, {self.width}) read-outs and n difficulties, got {features.shape} and "
                f"{difficulties.shape}"
            )
        if not self.policy.enabled:
            return [{"state": "off", "fallback": False, "reason": "transfer guard switched off"}] * len(features)
        novelty = self.novelty.percentile(features)
        verdicts = []
        with self._lock:
            for nov, diff in zip(novelty, difficulties, strict=True):
                self._novelty.append(float(nov))
                self._difficulty.append(float(diff))
                verdicts.append(self._verdict())
        return verdicts

    def _verdict(self) -> dict:
        if self.tripped is not None:
            return {**self.tripped, "state": "fallback", "fallback": True}
        stats: dict[str, float] = {"window": self.seen}
        if self.seen < self.policy.min_queries:
            return {
                "state": "warming_up",
                "fallback": False,
                "reason": f"{self.seen} of {self.policy.min_queries} queries seen; the head routes until then",
                **stats,
            }
        median_novelty = float(np.median(self._novelty))
        median_difficulty = float(self.difficulty_percentile(np.array([np.median(self._difficulty)]))[0])
        stats.update({"median_novelty": median_novelty, "median_difficulty_percentile": median_difficulty})
        low, high = self.policy.difficulty_range
        reasons = []
        if median_novelty > self.policy.max_median_novelty:
            reasons.append(
                f"the median novelty percentile of the last {self.seen} queries is {median_novelty:.1f} "
                f"(> {self.policy.max_median_novelty:g}): the traffic is unlike the head's training queries"
            )
        if not low <= median_difficulty <= high:
            reasons.append(
                f"the median difficulty of the last {self.seen} queries sits at the {median_difficulty:.1f}th "
                f"percentile of training (outside [{low:g}, {high:g}]): the head is extrapolating"
            )
        if reasons:
            self.tripped = {
                "reason": "the zero-label head may not transfer to this traffic, so every query goes to the most "
                "capable model until labels arrive: " + "; ".join(reasons),
                **stats,
            }
            return {**self.tripped, "state": "fallback", "fallback": True}
        return {
            "state": "transfers",
            "fallback": False,
            "reason": "the window looks like the training queries",
            **stats,
        }

    # -- persistence ---------------------------------------------------------------
    def arrays(self, prefix: str = "transfer") -> dict[str, np.ndarray]:
        out = self.novelty.arrays(f"{prefix}.novelty")
        out[f"{prefix}.difficulty_quantiles"] = self.difficulty_quantiles
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], policy: Any = None, prefix: str = "transfer") -> TransferGuard:
        """Rebuild from :meth:`arrays` and :meth:`GuardPolicy.to_dict` (ValueError when anything is missing)."""
        try:
            novelty = NoveltyScore.from_arrays(arrays, f"{prefix}.novelty")
            quantiles = arrays[f"{prefix}.difficulty_quantiles"]
        except KeyError as exc:
            raise ValueError(f"the saved transfer guard lacks the array {exc.args[0]!r}") from None
        return cls(novelty, quantiles, policy if isinstance(policy, GuardPolicy) else GuardPolicy.from_dict(policy))

    def save(self, directory: str | os.PathLike) -> Path:
        """``transfer_guard.json`` (policy, arrays' sha256) + ``transfer_guard.safetensors`` in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digest = write_arrays(directory / GUARD_ARRAYS, self.arrays())
        manifest = {"format": FORMAT, "policy": self.policy.to_dict(), "arrays_sha256": digest}
        (directory / GUARD_MANIFEST).write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TransferGuard:
        """The guard saved in ``directory``; the arrays' sha256 is checked and nothing is executed."""
        directory = Path(directory)
        path = directory / GUARD_MANIFEST
        if not path.is_file() or not (directory / GUARD_ARRAYS).is_file():
            raise FileNotFoundError(f"{directory} holds no transfer guard ({GUARD_MANIFEST} + {GUARD_ARRAYS})")
        manifest = read_manifest(path)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format is {str(manifest.get('format'))[:40]!r}, expected {FORMAT!r}")
        arrays, _ = load_arrays(directory / GUARD_ARRAYS, field(manifest, "arrays_sha256", "str", str(path)))
        return cls.from_arrays(arrays, field(manifest, "policy", "dict", str(path)))
