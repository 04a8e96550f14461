"""Zero-label routing: a general difficulty head shipped with the package, and the ladder router built on it.

A new user has a pool and no correctness labels. The shipped head reads one scalar
difficulty per query from the default extractor's read-out, fitted as an item-response
(IRT, two-parameter logistic) model on public many-model tables -- MMLU-Pro's 29 models
and LLMRouter's 9 -- where P(model m answers q) = sigmoid(a_m (ability_m - difficulty(q)))
and difficulty(q) is linear in the read-out. RouteLLM's MMLU is deliberately left out so it
can serve as the untouched test (``benchmarks/zero_label.py``).

:meth:`DifficultyRouter.pretrained` (from :func:`ladder_parts`) turns the head into an ordinary
:class:`DifficultyRouter` for the user's ladder (models cheapest -> most capable): rung k gets
the IRT curve of a model whose 50%-ability sits at the k-th difficulty boundary, and the threshold policy at tau = 0.5
picks the cheapest rung whose curve is above one half, so queries above the k-th boundary go
up the ladder. Boundaries are quantiles of difficulty (even shares by default) on the head's
training queries, or on the user's own prompts after :meth:`DifficultyRouter.calibrate`
with ``unlabelled=``. The router saves, loads, routes and serves like a trained one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.learning.bundle import field, load_arrays, read_manifest, write_arrays
from difficulty_router.learning.transfer_guard import GUARD_MANIFEST, GuardPolicy, TransferGuard

FORMAT = "difficulty-router/irt-head/1"
#: where the shipped head lives inside the package
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained_head"
HEAD_ARRAYS = "difficulty_head.safetensors"
HEAD_MANIFEST = "difficulty_head.json"
#: ``router.info`` key marking a zero-label ladder router and holding what recalibration needs
INFO_KEY = "zero_label"
#: quantile levels stored for the head's training-difficulty distribution (0, 0.005, ..., 1)
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 201)
#: how far (in sd of training difficulty) a boundary moves past the sample for a share of exactly 0 or 1
UNBOUNDED = 50.0
#: the least ability the top rung is given, in sd of training difficulty
TOP_ABILITY = 3.0


class DifficultyHead:
    """difficulty(q) = standardise(read-out) @ weight + bias, on the scale of the training queries (mean 0, sd 1).

    ``discrimination`` is the median IRT slope of the training models on that scale: how
    sharply a model's success falls as difficulty passes its ability.
    """

    def __init__(
        self,
        *,
        mean: np.ndarray,
        scale: np.ndarray,
        weight: np.ndarray,
        bias: float,
        discrimination: float,
        quantiles: np.ndarray,
        extractor: dict,
        layers: Sequence[int],
        pooling: Sequence[str],
        info: dict | None = None,
    ) -> None:
        self.mean, self.scale, self.weight = (np.asarray(x, dtype=np.float64) for x in (mean, scale, weight))
        self.bias, self.discrimination = float(bias), float(discrimination)
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        self.extractor, self.layers, self.pooling = dict(extractor), [int(x) for x in layers], list(pooling)
        self.info = dict(info or {})
        width = len(self.layers) * len(self.pooling) * int(self.extractor["hidden_size"])
        if not (self.mean.shape == self.scale.shape == self.weight.shape == (width,)):
            raise ValueError(f"difficulty head arrays must have {width} entries for its read-out")
        if self.quantiles.shape != QUANTILE_LEVELS.shape or np.any(np.diff(self.quantiles) < 0):
            raise ValueError("difficulty head quantiles must be non-decreasing, one per stored level")
        if not np.isfinite(self.discrimination) or self.discrimination <= 0:
            raise ValueError(f"difficulty head discrimination must be positive, got {self.discrimination}")

    def difficulty(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.weight):
            raise ValueError(f"features must be (n, {len(self.weight)}), got {features.shape}")
        return ((features - self.mean) / self.scale) @ self.weight + self.bias

    def quantile(self, levels) -> np.ndarray:
        """Difficulty at these quantile levels of the training queries."""
        return np.interp(levels, QUANTILE_LEVELS, self.quantiles)

    # -- persistence -----------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "quantiles": self.quantiles}
        arrays_sha256 = write_arrays(directory / HEAD_ARRAYS, arrays)
        manifest = {
            "format": FORMAT,
            "extractor": self.extractor,
            "readout": {"layers": self.layers, "pooling": self.pooling},
            "bias": self.bias,
            "discrimination": self.discrimination,
            "arrays_sha256": arrays_sha256,
            "info": self.info,
        }
        (directory / HEAD_MANIFEST).write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None) -> DifficultyHead:
        """The head in ``directory`` (default: the one shipped in the package); its arrays' sha256 is checked."""
        directory = Path(directory) if directory is not None else PRETRAINED_DIR
        path = directory / HEAD_MANIFEST
        if not path.is_file() or not (directory / HEAD_ARRAYS).is_file():
            raise FileNotFoundError(
                f"{directory} holds no pretrained difficulty head ({HEAD_MANIFEST} + {HEAD_ARRAYS})"
            )
        where = str(path)
        manifest = read_manifest(path)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{where}: format is {str(manifest.get('format'))[:40]!r}, expected {FORMAT!r}")
        arrays, _ = load_arrays(directory / HEAD_ARRAYS, field(manifest, "arrays_sha256", "str", where))
        readout = field(manifest, "readout", "dict", where)
        extractor = field(manifest, "extractor", "dict", where)
        for key, kind in (("model_id", "str"), ("model_hash", "str"), ("hidden_size", "int"), ("n_layers", "int")):
            field(extractor, key, kind, f"{where}: extractor")
        try:
            return cls(
                mean=arrays["mean"],
                scale=arrays["scale"],
                weight=arrays["weight"],
                quantiles=arrays["quantiles"],
                bias=field(manifest, "bias", "float", where),
                discrimination=field(manifest, "discrimination", "float", where),
                extractor=extractor,
                layers=field(readout, "layers", "list", f"{where}: readout"),
                pooling=field(readout, "pooling", "list", f"{where}: readout"),
                info=field(manifest, "info", "dict", where, optional=True, default={}),
            )
        except KeyError as exc:
            raise ValueError(f"{directory / HEAD_ARRAYS} lacks the array {exc.args[0]!r}") from None


def fit_irt(
    sources: Sequence[tuple[np.ndarray, np.ndarray]], *, l2: float = 1.0, max_iter: int = 300
) -> dict[str, Any]:
    """Fit the shared linear difficulty and per-source model parameters by maximum likelihood (L-BFGS).

    ``sources``: (features (n, d), outcomes (n, models) in [0, 1], NaN where a model has no
    record) per data set; each set keeps its own models' ability and discrimination, the
    difficulty weights are shared. Returns the standardiser, the weights rescaled so the
    training difficulties have mean 0 and sd 1, and each source's abilities and slopes on
    that scale.
    """
    import torch

    if not sources:
        raise ValueError("fit_irt needs at least one (features, outcomes) source")
    stacked = np.concatenate([np.asarray(x, dtype=np.float64) for x, _ in sources])
    mean, scale = stacked.mean(0), stacked.std(0) + 1e-6
    zs = [torch.tensor((np.asarray(x) - mean) / scale, dtype=torch.float32) for x, _ in sources]
    targets, masks, thetas, log_slopes = [], [], [], []
    for (_, y), z in zip(sources, zs, strict=True):
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 2 or len(y) != len(z):
            raise ValueError(f"outcomes must be (n, models) with n = {len(z)}, got {y.shape}")
        observed = ~np.isnan(y)
        rate = np.clip(np.nanmean(y, axis=0), 0.02, 0.98)
        targets.append(torch.tensor(np.nan_to_num(y, nan=0.5), dtype=torch.float32))
        masks.append(torch.tensor(observed, dtype=torch.float32))
        thetas.append(torch.tensor(np.log(rate / (1 - rate)), dtype=torch.float32, requires_grad=True))
        log_slopes.append(torch.zeros(y.shape[1], requires_grad=True))
    weight = torch.zeros(zs[0].shape[1], requires_grad=True)
    params = [weight, *thetas, *log_slopes]
    total = sum(float(m.sum()) for m in masks)
    optimiser = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = l2 * (weight**2).sum()
        for z, t, m, theta, log_a in zip(zs, targets, masks, thetas, log_slopes, strict=True):
            logit = log_a.exp()[None, :] * (theta[None, :] - (z @ weight)[:, None])
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, t, reduction="none")
            loss = loss + (bce * m).sum() / total
        loss.backward()
        return loss

    optimiser.step(closure)
    w = weight.detach().double().numpy()
    raw = ((stacked - mean) / scale) @ w
    centre, spread = float(raw.mean()), float(raw.std()) or 1.0
    abilities = [(t.detach().double().numpy() - centre) / spread for t in thetas]
    slopes = [s.detach().exp().double().numpy() * spread for s in log_slopes]
    return {
        "mean": mean,
        "scale": scale,
        "weight": w / spread,
        "bias": -centre / spread,
        "abilities": abilities,
        "slopes": slopes,
        "train_difficulty": (raw - centre) / spread,
    }


# -- the ladder router ---------------------------------------------------------------------
def _ladder_pool(pool: Any):
    from difficulty_router.core.pool import ModelPool, PoolModel

    if isinstance(pool, ModelPool):
        costs = pool.costs([400.0])[0]
        if np.any(np.diff(costs) < 0):
            raise ValueError(
                f"the pool must list models from cheapest to most capable; its costs per query "
                f"(400-character prompt) are {dict(zip(pool.names, np.round(costs, 8).tolist(), strict=True))}"
            )
        return pool, "prices"
    if isinstance(pool, str) or not isinstance(pool, Sequence):
        raise TypeError(
            f"pool must be a ModelPool or a list of model names (cheapest first), got {type(pool).__name__}"
        )
    names = list(pool)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError("pool model names must be non-empty strings")
    if len(set(names)) != len(names):
        raise ValueError(f"pool model names repeat: {names}")
    # no prices given: relative costs 1, 2, ... keep the ladder order for the threshold policy
    return ModelPool(tuple(PoolModel(name=n, cost_per_query=float(k + 1)) for k, n in enumerate(names))), "rank"


def check_shares(shares: Sequence[float], n_models: int) -> np.ndarray:
    values = np.asarray(shares, dtype=np.float64)
    if values.shape != (n_models,):
        raise ValueError(f"shares must give one share per pool model ({n_models}), got {len(values)}")
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError(f"each share must lie in [0, 1], got {values.tolist()}")
    if abs(values.sum() - 1) > 1e-6:
        raise ValueError(f"shares must sum to 1, got {values.sum():.6f}")
    return values


def ladder_boundaries(difficulties_or_head: Any, shares: np.ndarray) -> np.ndarray:
    """Difficulty boundary above which traffic leaves rung k, k = 0..K-2, from the cumulative shares."""
    levels = np.clip(np.cumsum(shares)[:-1], 0.0, 1.0)
    if isinstance(difficulties_or_head, DifficultyHead):
        bounds = difficulties_or_head.quantile(levels)
    else:
        bounds = np.quantile(np.asarray(difficulties_or_head, dtype=np.float64), levels)
    # a share of exactly 0 or 1 means none / all of any traffic, not just of the sample: push the boundary far out
    return np.where(levels <= 1e-9, bounds - UNBOUNDED, np.where(levels >= 1 - 1e-9, bounds + UNBOUNDED, bounds))


def set_ladder(router, boundaries: np.ndarray, shares: np.ndarray, source: str) -> None:
    """Place the rungs' IRT curves at ``boundaries`` (rung k succeeds with P = 1/2 at boundary k)."""
    meta = router.info[INFO_KEY]
    a, bias = float(meta["discrimination"]), float(meta["bias"])
    # the top rung is chosen whenever no cheaper rung qualifies; its curve sits two sd above the last boundary,
    # and at least 3 sd above the training mean (a model stronger than nearly all of the training queries)
    thetas = np.r_[boundaries, max(float(boundaries[-1]) + 2.0, TOP_ABILITY)]
    router.probe.intercept_ = a * (thetas - bias)
    meta.update({"shares": shares.tolist(), "boundaries": boundaries.tolist(), "boundaries_from": source})


def ladder_difficulty(router, features: np.ndarray) -> np.ndarray:
    """The head's difficulty of each row, recovered from rung 0 of a ladder router's probe."""
    meta = router.info[INFO_KEY]
    a, bias = float(meta["discrimination"]), float(meta["bias"])
    logit = router.probe.decision_function(features)[:, 0]
    return (router.probe.intercept_[0] - logit) / a + bias


def is_ladder(router) -> bool:
    return INFO_KEY in router.info


def ladder_guard(
    head: DifficultyHead, directory: Path | None, transfer_guard: bool | GuardPolicy | None, low: float, step: float
) -> TransferGuard | None:
    """The transfer guard of a zero-label ladder (:mod:`difficulty_router.learning.transfer_guard`), or None.

    ``transfer_guard``: None/False, none; True, the guard saved next to the head with its saved policy; a
    :class:`GuardPolicy`, that guard with this policy. The saved reference holds difficulties on the head's
    scale; the router reports the 1-5 scale (``1 + (difficulty - low) * step``, clipped), so they are mapped.
    """
    if transfer_guard is None or transfer_guard is False:
        return None
    if transfer_guard is not True and not isinstance(transfer_guard, GuardPolicy):
        raise TypeError(f"transfer_guard must be True, False, None or a GuardPolicy, got {transfer_guard!r}")
    if directory is None:
        raise ValueError(
            "a transfer guard needs the head's directory (its reference is saved there), not a head object"
        )
    if not (directory / GUARD_MANIFEST).is_file():
        raise FileNotFoundError(
            f"{directory} holds no transfer guard reference for this head ({GUARD_MANIFEST}); "
            "benchmarks/zero_label_guard.py --write-reference writes it"
        )
    saved = TransferGuard.load(directory)
    if saved.width != len(head.weight):
        raise ValueError(f"the saved transfer guard reads {saved.width} features, the head {len(head.weight)}")
    policy = transfer_guard if isinstance(transfer_guard, GuardPolicy) else saved.policy
    return TransferGuard(saved.novelty, np.clip(1.0 + (saved.difficulty_quantiles - low) * step, 1.0, 5.0), policy)


def ladder_parts(
    pool: Any,
    *,
    shares: Sequence[float] | None = None,
    extractor=None,
    head: DifficultyHead | str | os.PathLike | None = None,
    transfer_guard: bool | GuardPolicy | None = None,
    **extractor_kwargs,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """What :meth:`DifficultyRouter.pretrained` builds a zero-label router from: the router's constructor
    arguments, the share of traffic per model and the rungs' difficulty boundaries (for :func:`set_ladder`).

    ``pool``: model names cheapest -> most capable, or a :class:`ModelPool` listed in that order with
    prices; ``shares`` default to even. The router class is not imported here, so that the router can
    offer ``pretrained`` without this module importing it back."""
    from difficulty_router.extraction.extractor import ActivationExtractor
    from difficulty_router.learning.policies import Policy
    from difficulty_router.learning.probe_arrays import calibrated_probe_arrays
    from difficulty_router.learning.probes import DifficultyProbe, SuccessProbe

    # the guard's reference is saved next to its head: known for the shipped head and for a head's directory
    head_dir = PRETRAINED_DIR if head is None else None if isinstance(head, DifficultyHead) else Path(head)
    head = head if isinstance(head, DifficultyHead) else DifficultyHead.load(head)
    model_pool, costing = _ladder_pool(pool)
    k = len(model_pool)
    if k < 2:
        raise ValueError(f"a ladder needs at least two models, got {model_pool.names}")
    share_values = check_shares(shares if shares is not None else [1.0 / k] * k, k)
    if extractor is None:
        extractor = ActivationExtractor(
            head.extractor["model_id"],
            layers=head.layers,
            pooling=head.pooling,
            max_tokens=int(head.extractor.get("max_tokens", 512)),
            **extractor_kwargs,
        )
    if extractor.model_hash != head.extractor["model_hash"]:
        raise ValueError(
            f"the pretrained head reads {head.extractor['model_id']!r} (weights sha256 "
            f"{head.extractor['model_hash'][:12]}...), not {extractor.model_id!r}"
        )
    a = head.discrimination
    probe = SuccessProbe.from_arrays(
        calibrated_probe_arrays(
            "success",
            mean=head.mean,
            scale=head.scale,
            coef=np.tile(-a * head.weight, (k, 1)),
            intercept=np.zeros(k),
            platt=np.tile([1.0, 0.0], (k, 1)),
        )
    )
    # 1-5 difficulty for decisions: the head's 1st..99th training percentiles mapped linearly onto 1..5
    low, high = head.quantile([0.01, 0.99])
    step = 4.0 / max(high - low, 1e-6)
    difficulty_probe = DifficultyProbe.from_arrays(
        {
            "difficulty.standardizer.mean": head.mean,
            "difficulty.standardizer.scale": head.scale,
            "difficulty.coef": head.weight * step,
            "difficulty.intercept": np.array([1.0 + (head.bias - low) * step]),
        }
    )
    info = {
        INFO_KEY: {
            "head": head.info,
            "discrimination": a,
            "bias": head.bias,
            "costing": costing,
            "probabilities": "IRT curve of a model whose 50% ability is the rung's upper difficulty boundary "
            "(top rung: 2 sd above the last boundary, at least 3 sd above the training mean)",
        }
    }
    parts = {
        "extractor": extractor,
        "pool": model_pool,
        "probe": probe,
        "layers": head.layers,
        "pooling": head.pooling,
        "capability": np.linspace(0.0, 1.0, k),
        "policy": Policy("threshold", 0.5),
        "difficulty_probe": difficulty_probe,
        "info": info,
        "transfer_guard": ladder_guard(head, head_dir, transfer_guard, float(low), step),
    }
    return parts, share_values, ladder_boundaries(head, share_values)
