"""``dtype="auto"`` on a CPU: the fastest numeric path whose read-out keeps its quality, by measurement.

Which path is fastest is a property of the machine and the model, not of a flag list: on an Intel
Xeon with AMX a 100-token read-out of SmolLM2-135M took 60 ms in float32, 45 ms in int8 and 33 ms in
bf16 (benchmarks/overhead.py); on an Ice Lake Xeon (no bf16) int8 took 0.76x float32's time on a
loaded machine, a margin the machine's load can swallow. So the first extractor
built on "auto" on a machine times each path the CPU offers on a few real prompts at its read-out
layers (a few seconds, once), keeps only paths that keep quality (below), picks the fastest (the path
the CPU's flags suggest stays unless another is ``MARGIN`` faster), and writes the choice to the cache
directory keyed by the CPU, torch, the weights and the read-out. Every later extractor with the same
key reads it. A choice timed while the machine's load exceeded its cores is used but not cached.

What "keeps its quality" means depends on who reads the read-out. A saved router loaded on "auto"
(``DifficultyRouter.load``) passes its success probe (:class:`ReadoutQuality`): a path is kept when
no probe prompt's P(success) moves more than 0.05 (absolute) from float32's, and the choice is cached
per router. A bare extractor has no consumer yet, so its read-out must stay within 5% (relative L2)
of float32's, which bounds a linear probe's logit change by ``0.05 |w| |x|``. int8 (dynamic, per
channel) moved SmolLM2-135M's layer-15 read-out by 11-14%, so a bare extractor refuses it there; a
router whose probabilities int8 leaves in place gets it on the machines where it is faster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difficulty_router.extraction.model_store import cache_root, fingerprint
from difficulty_router.extraction.numerics import (
    DTYPE_ENV,
    auto_unpinned,
    cpu_flags,
    cpu_has_bf16,
    cpu_has_int8_dot,
    cpu_model_name,
    dtype_name,
    int8_supported,
    pick_dtype,
    usable_cores,
)

logger = logging.getLogger(__name__)

#: ``$DIFFICULTY_ROUTER_AUTO=capability`` makes "auto" pick by the CPU's flags alone, without timing anything.
AUTO_ENV = "DIFFICULTY_ROUTER_AUTO"
#: A path is kept only if every probe prompt's read-out is within this relative L2 error of float32's.
READOUT_RTOL = 0.05
#: Bump when the measurement changes, so choices made by an older procedure are not reused.
PROCEDURE = 2
#: Another path replaces the one the CPU's flags suggest only when it is at least this much faster.
MARGIN = 0.10
PROBE_PROMPTS = 6
REPEATS = 5


@dataclass(frozen=True)
class ReadoutQuality:
    """How a known consumer of the read-out judges a path, instead of the read-out's own distance.

    A saved router passes its success probe: ``score`` maps read-out rows to P(success) per model,
    and a path is kept when no probe prompt's probability moves more than ``tolerance`` (absolute)
    from float32's. ``name`` (the router's arrays hash) keys the cached choice, so another router
    on the same extractor is judged again.
    """

    name: str
    score: Callable[[np.ndarray], np.ndarray]
    tolerance: float = 0.05
    what: str = "P(success)"


@dataclass(frozen=True)
class PathTrial:
    """One path's measurement: median milliseconds per 100 prompt tokens, and how far it is from float32
    by ``criterion`` (the read-out's relative L2 distance, or a router's P(success) moved)."""

    path: str
    ms_per_100_tokens: float
    error: float
    criterion: str
    accepted: bool
    reason: str


@dataclass(frozen=True)
class NumericPath:
    """The path an extractor runs and how it was chosen; ``choice`` holds the measurement when "auto" measured."""

    dtype: torch.dtype
    how: str
    choice: PathChoice | None = None

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    def describe(self) -> dict[str, Any]:
        return self.choice.describe() if self.choice is not None else {"path": self.name, "how": self.how}


@dataclass(frozen=True)
class PathChoice:
    """The path "auto" chose on this machine and why; ``from_cache`` when an earlier process measured it."""

    path: str
    trials: tuple[PathTrial, ...]
    cpu: str
    from_cache: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.qint8 if self.path == "int8" else getattr(torch, self.path)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "how": "measured on this machine" + (" (cached)" if self.from_cache else ""),
            "cpu": self.cpu,
            "trials": [asdict(trial) for trial in self.trials],
        }

    def summary(self) -> str:
        parts = [
            f"{t.path} {t.ms_per_100_tokens:.1f} ms/100 tokens" + ("" if t.accepted else f" (refused: {t.reason})")
            for t in self.trials
        ]
        return (
            f"numeric path {self.path} on {self.cpu} (the fastest kept path, unless the usual one is within 10%): "
            + "; ".join(parts)
        )


def measuring_enabled(device: torch.device) -> bool:
    """Whether "auto" measures here: on a CPU, unless ``$DIFFICULTY_ROUTER_AUTO=capability``."""
    mode = os.environ.get(AUTO_ENV, "measure").strip().lower() or "measure"
    if mode not in ("measure", "capability"):
        raise ValueError(f"${AUTO_ENV}={mode!r} is not a mode; expected 'measure' or 'capability'")
    return mode == "measure" and device.type == "cpu"


def candidate_paths() -> list[str]:
    """float32 always (the reference), bf16 where the CPU has it natively, int8 where it has int8 dot products."""
    paths = ["float32"]
    if cpu_has_bf16():
        paths.append("bfloat16")
    if cpu_has_int8_dot() and int8_supported():
        paths.append("int8")
    return paths


def _key(model_hash: str, layers: Any, pooling: Any, max_tokens: int, quality: ReadoutQuality | None = None) -> str:
    flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx512_vnni", "avx_vnni"})
    judged = None if quality is None else [quality.name, quality.tolerance]
    text = json.dumps(
        [
            PROCEDURE,
            cpu_model_name(),
            flags,
            torch.__version__,
            model_hash,
            repr(layers),
            repr(pooling),
            max_tokens,
            judged,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load(path: Path) -> PathChoice | None:
    try:
        raw = json.loads(path.read_text())
        trials = tuple(PathTrial(**trial) for trial in raw["trials"])
        choice = PathChoice(path=raw["path"], trials=trials, cpu=raw["cpu"], from_cache=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or written by something else: measure again
    return choice if choice.path in candidate_paths() else None


def probe_prompts() -> list[str]:
    """Real questions from the shipped RouteLLM MMLU sample (about 60-200 tokens with the template)."""
    from difficulty_router.data.outcomes import load_outcomes
    from difficulty_router.datasets import ROUTELLM_MMLU_SAMPLE

    queries = load_outcomes(ROUTELLM_MMLU_SAMPLE).queries
    return [str(q) for q in queries[:PROBE_PROMPTS]]


def _one_pass(extractor, prompts: Sequence[str]) -> tuple[float, np.ndarray]:
    """Milliseconds per 100 tokens of single-query read-outs of ``prompts``, and the read-outs."""
    tokens, seconds, outputs = 0, 0.0, []
    for prompt in prompts:
        start = time.perf_counter()
        rows = extractor.extract([prompt], progress=False)
        seconds += time.perf_counter() - start
        tokens += int(rows.n_tokens[0])
        outputs.append(rows.features[0])
    return 100_000 * seconds / max(tokens, 1), np.stack(outputs)


def _relative_error(rows: np.ndarray, reference: np.ndarray) -> float:
    diff = np.linalg.norm(rows - reference, axis=1)
    return float((diff / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)).max())


def machine_busy() -> bool:
    """Whether the 1-minute load average exceeds the cores this process may use (False where unknown)."""
    return hasattr(os, "getloadavg") and os.getloadavg()[0] > usable_cores()


def _winner(trials: Sequence[PathTrial], usual: str) -> PathTrial:
    """The fastest kept path, except that the path the CPU's flags suggest (``usual``) stays unless another
    kept path is at least ``MARGIN`` faster: a close race is within what a busy machine's noise can do."""
    kept = [t for t in trials if t.accepted]
    fastest = min(kept, key=lambda t: t.ms_per_100_tokens)
    default = next((t for t in kept if t.path == usual), None)
    if default is None or fastest.ms_per_100_tokens < (1 - MARGIN) * default.ms_per_100_tokens:
        return fastest
    return default


def _judge(rows: np.ndarray, reference: np.ndarray, quality: ReadoutQuality | None) -> tuple[float, str, float]:
    """(error, criterion, tolerance) of one path's read-outs against float32's."""
    if quality is None:
        return _relative_error(rows, reference), "read-out relative L2", READOUT_RTOL
    moved = np.abs(np.asarray(quality.score(rows), float) - np.asarray(quality.score(reference), float))
    return float(moved.max()), f"router {quality.what}, absolute", quality.tolerance


def choose_path(
    build,
    model_hash: str,
    layers: Any,
    pooling: Any,
    max_tokens: int,
    cache_dir: Path,
    quality: ReadoutQuality | None = None,
) -> PathChoice:
    """The measured path for this machine and read-out, from ``cache_dir`` when measured before.

    ``build(dtype=name)`` makes an extractor on one path (same model, layers, pooling, no feature cache);
    ``quality``, when given, judges the paths by what its consumer (a router's probe) makes of the read-out.
    """
    file = cache_dir / f"{_key(model_hash, layers, pooling, max_tokens, quality)}.json"
    cached = _load(file)
    if cached is not None:
        logger.info("%s", cached.summary())
        return cached
    paths = candidate_paths()
    logger.info("choosing the numeric path once for this machine: timing %s", ", ".join(paths))
    prompts = probe_prompts()
    # All paths are loaded together and timed in turns, so a change in the machine's load during the
    # measurement falls on every path alike instead of on whichever ran then.
    extractors = {path: build(dtype=path) for path in paths}
    timings: dict[str, list[float]] = {path: [] for path in paths}
    rows: dict[str, np.ndarray] = {}
    for extractor in extractors.values():
        extractor.extract(prompts[:1], progress=False)  # warm-up: kernels, allocator, template prefix
    for _ in range(REPEATS):
        for path, extractor in extractors.items():
            ms, rows[path] = _one_pass(extractor, prompts)
            timings[path].append(ms)
    del extractors
    trials = []
    for path in paths:
        error, criterion, tolerance = _judge(rows[path], rows["float32"], quality)
        accepted = error <= tolerance
        reason = "" if accepted else f"{criterion} {error:.3g} from float32's, over {tolerance:g}"
        trials.append(PathTrial(path, float(np.median(timings[path])), error, criterion, accepted, reason))
    best = _winner(trials, dtype_name(pick_dtype("auto", torch.device("cpu"))))
    choice = PathChoice(path=best.path, trials=tuple(trials), cpu=cpu_model_name())
    if machine_busy():
        # Timings taken while other work held the cores say little about this machine: use the choice
        # for this process only, and measure again next time.
        logger.warning("the machine was busy while timing the numeric paths; this choice is not cached")
        return choice
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({k: v for k, v in choice.describe().items() if k != "how"}))
    tmp.replace(file)
    logger.info("%s", choice.summary())
    return choice


def resolve_numeric_path(
    dtype: Any,
    device: torch.device,
    source,
    build,
    readout: tuple[Any, Any, int],
    quality: ReadoutQuality | None = None,
) -> NumericPath:
    """What an extractor of ``source`` runs: ``dtype`` as asked, else $DIFFICULTY_ROUTER_DTYPE, else measured
    (on a CPU; ``build(dtype=path)`` makes the extractors to time, ``readout`` is (layers, pooling, max_tokens),
    ``quality`` judges them for a known consumer), else by the device's capability."""
    if not auto_unpinned(dtype):
        how = f"pinned by ${DTYPE_ENV}" if dtype in (None, "auto") else "asked for"
        return NumericPath(pick_dtype(dtype, device, source.model_id), how)
    if not measuring_enabled(device):
        return NumericPath(pick_dtype(dtype, device, source.model_id), "by the device's capability")
    choice = choose_path(build, fingerprint(source), *readout, cache_root() / "path_choice", quality)
    return NumericPath(choice.dtype, choice.describe()["how"], choice)
