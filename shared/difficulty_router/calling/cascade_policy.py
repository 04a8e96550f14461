"""The cascade's policy: when a rung's answer is good enough, and how to set that from labelled rows.

The policy is pure bookkeeping over two signals per rung: P(T), from the answer's token
log-probabilities (any endpoint that returns logprobs), and P(IK), a probe on the rung's
own pre-generation hidden state (local rungs only). :meth:`CascadePolicy.decide` is the live
verdict (a routed call takes it through :class:`~difficulty_router.calling.verdict.CascadeVerdict`);
:func:`simulate` and :meth:`CascadePolicy.calibrate` replay logged signals to set thresholds
to a cost or accuracy target, like the pre-generation policies. Nothing here calls a model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from difficulty_router.calling.confidence import REDUCTIONS, MissingLogprobsError

SIGNALS = ("pt", "pik")
COMBINE_RULES = ("either", "learned")
ON_MISSING = ("error", "pik_only", "escalate")


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _per_rung(value: Any, rungs: Sequence[str], what: str) -> dict[str, float]:
    """A threshold given once for every rung, or per rung by name."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(rungs))
        if unknown:
            raise ValueError(f"{what} names rungs {unknown} that are not below the top of the ladder {list(rungs)}")
        out = dict(value)
    else:
        out = {r: value for r in rungs}
    for rung, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{what} for {rung!r} must be a number in [0, 1], got {v!r}")
    return {r: float(v) for r, v in out.items()}


@dataclass
class CascadePolicy:
    """When to accept a rung's answer and when to escalate.

    Args:
        ladder: model names from cheapest to most capable (2 or more). The top rung's
            answer is always accepted.
        signals: which confidences decide: ``("pt",)``, ``("pik",)`` or both.
        pt_threshold / pik_threshold: escalate when the signal is below it; one number for
            every rung or a dict per rung name.
        combine: ``"either"`` escalates if any used signal is below its threshold (the
            paper's rule); ``"learned"`` fits a logistic combination of both on labelled
            rows (:meth:`fit_combiner`) and thresholds that with ``combined_threshold``.
        reduce: how P(T) reads the answer's log-probabilities: first token, mean, or minimum.
        on_missing_logprobs: what to do when a rung's backend returns no logprobs: raise
            (``"error"``), decide on P(IK) alone (``"pik_only"``), or escalate.
    """

    ladder: Sequence[str]
    signals: Sequence[str] = ("pt",)
    pt_threshold: Any = 0.5
    pik_threshold: Any = 0.5
    combine: str = "either"
    combined_threshold: Any = 0.5
    reduce: str = "first"
    on_missing_logprobs: str = "error"
    combiners: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ladder = tuple(self.ladder) if not isinstance(self.ladder, str) else (self.ladder,)
        if len(ladder) < 2 or not all(isinstance(m, str) and m for m in ladder):
            raise ValueError(f"a cascade needs a ladder of 2 or more model names, got {self.ladder!r}")
        if len(set(ladder)) != len(ladder):
            raise ValueError(f"the ladder names a model twice: {list(ladder)}")
        self.ladder = ladder
        signals = (self.signals,) if isinstance(self.signals, str) else tuple(self.signals)
        if not signals or any(s not in SIGNALS for s in signals) or len(set(signals)) != len(signals):
            raise ValueError(f"signals must be a non-empty subset of {SIGNALS}, got {self.signals!r}")
        self.signals = signals
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {self.combine!r}; expected one of {COMBINE_RULES}")
        if self.combine == "learned" and set(signals) != set(SIGNALS):
            raise ValueError("combine='learned' needs both signals: signals=('pt', 'pik')")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduce {self.reduce!r}; expected one of {REDUCTIONS}")
        if self.on_missing_logprobs not in ON_MISSING:
            raise ValueError(f"on_missing_logprobs must be one of {ON_MISSING}, got {self.on_missing_logprobs!r}")
        if self.on_missing_logprobs == "pik_only" and "pik" not in signals:
            raise ValueError("on_missing_logprobs='pik_only' needs the 'pik' signal")
        lower = self.ladder[:-1]
        self.pt_threshold = _per_rung(self.pt_threshold, lower, "pt_threshold")
        self.pik_threshold = _per_rung(self.pik_threshold, lower, "pik_threshold")
        self.combined_threshold = _per_rung(self.combined_threshold, lower, "combined_threshold")
        for rung in lower:
            for signal in signals:
                table = self.combined_threshold if self.combine == "learned" else self._table(signal)
                if rung not in table:
                    raise ValueError(f"rung {rung!r} has no threshold for {signal!r}")
        self.combiners = {r: [float(x) for x in w] for r, w in dict(self.combiners).items()}

    def _table(self, signal: str) -> dict[str, float]:
        return self.pt_threshold if signal == "pt" else self.pik_threshold

    @property
    def needs_logprobs(self) -> bool:
        return "pt" in self.signals

    @property
    def needs_pik(self) -> bool:
        return "pik" in self.signals

    def rung(self, model: str) -> int:
        try:
            return self.ladder.index(model)
        except ValueError:
            raise ValueError(f"{model!r} is not on the cascade's ladder {list(self.ladder)}") from None

    # -- one decision ----------------------------------------------------------------
    def combined(self, model: str, pt: float, pik: float) -> float:
        return float(self._combined_score(model, np.asarray(pt, dtype=np.float64), np.asarray(pik, dtype=np.float64)))

    def _combined_score(self, model: str, pt: np.ndarray, pik: np.ndarray) -> np.ndarray:
        """The learned combiner's confidence: one formula for live decisions and for replays."""
        if model not in self.combiners:
            raise ValueError(f"rung {model!r} has no learned combiner; call fit_combiner() on labelled rows first")
        w_pt, w_pik, bias = self.combiners[model]
        z = np.clip(w_pt * _logit(pt) + w_pik * _logit(pik) + bias, -40.0, 40.0)
        return 1.0 / (1.0 + np.exp(-z))

    def decide(self, model: str, pt: float | None, pik: float | None) -> tuple[bool, str]:
        """Accept this rung's answer? Returns the verdict and a reason a person can read."""
        index = self.rung(model)
        if index == len(self.ladder) - 1:
            return True, "top of the ladder"
        used = list(self.signals)
        if "pt" in used and pt is None:
            if self.on_missing_logprobs == "error":
                raise MissingLogprobsError(
                    f"rung {model!r} returned no logprobs, so P(T) is unknown; request logprobs from the "
                    "endpoint, or set on_missing_logprobs='pik_only' or 'escalate'"
                )
            if self.on_missing_logprobs == "escalate":
                return False, "no logprobs: escalating"
            used.remove("pt")
        if "pik" in used and pik is None:
            raise ValueError(
                f"rung {model!r} has no P(IK): give the rung a P(IK) probe (local model) or drop the signal"
            )
        if self.combine == "learned" and used == list(SIGNALS):
            assert pt is not None and pik is not None
            score, tau = self.combined(model, pt, pik), self.combined_threshold[model]
            if score < tau:
                return False, f"combined confidence {score:.3f} < {tau:g}"
            return True, f"combined confidence {score:.3f} >= {tau:g}"
        values: dict[str, float] = {s: v for s, v in (("pt", pt), ("pik", pik)) if v is not None}
        for signal in used:
            tau = self._table(signal)[model]
            if values[signal] < tau:
                return False, f"P({'T' if signal == 'pt' else 'IK'}) {values[signal]:.3f} < {tau:g}"
        return True, " and ".join(
            f"P({'T' if s == 'pt' else 'IK'}) {values[s]:.3f} >= {self._table(s)[model]:g}" for s in used
        )

    # -- learning from labelled rows ---------------------------------------------------
    def confidence_matrix(self, pt, pik) -> np.ndarray:
        """(n, rungs) single confidence per rung under this policy's rule (for learned combiners)."""
        pt, pik = np.asarray(pt, dtype=np.float64), np.asarray(pik, dtype=np.float64)
        out = np.empty_like(pt)
        for j, model in enumerate(self.ladder[:-1]):
            out[:, j] = self._combined_score(model, pt[:, j], pik[:, j])
        out[:, -1] = 1.0
        return out

    def fit_combiner(self, pt, pik, correct) -> CascadePolicy:
        """Per rung, logistic regression of "this rung was right" on logit P(T) and logit P(IK)."""
        from sklearn.linear_model import LogisticRegression

        pt, pik, correct = _check_signals(self.ladder, pt=pt, pik=pik, correct=correct)
        for j, model in enumerate(self.ladder[:-1]):
            y = (correct[:, j] >= 0.5).astype(int)
            if y.min() == y.max():
                raise ValueError(
                    f"rung {model!r} is always {'right' if y[0] else 'wrong'} on these rows; "
                    "a combiner cannot be learned from them"
                )
            X = np.c_[_logit(pt[:, j]), _logit(pik[:, j])]
            clf = LogisticRegression(C=1.0).fit(X, y)
            self.combiners[model] = [float(clf.coef_[0, 0]), float(clf.coef_[0, 1]), float(clf.intercept_[0])]
        return self

    def accept_matrix(self, pt=None, pik=None) -> np.ndarray:
        """(n, rungs) bool: would each rung's answer be accepted (logged signals, no missing values)."""
        n = len(pt if pt is not None else pik)
        accept = np.ones((n, len(self.ladder)), dtype=bool)
        if self.combine == "learned":
            score = self.confidence_matrix(pt, pik)
            for j, model in enumerate(self.ladder[:-1]):
                accept[:, j] = score[:, j] >= self.combined_threshold[model]
            return accept
        for j, model in enumerate(self.ladder[:-1]):
            if "pt" in self.signals:
                accept[:, j] &= pt[:, j] >= self.pt_threshold[model]
            if "pik" in self.signals:
                accept[:, j] &= pik[:, j] >= self.pik_threshold[model]
        return accept

    def calibrate(
        self,
        correct,
        cost,
        *,
        pt=None,
        pik=None,
        start=None,
        target_cost: float | None = None,
        target_accuracy: float | None = None,
        max_accuracy_drop: float | None = None,
        levels: int = 11,
    ) -> dict:
        """Set the per-rung thresholds on labelled rows to a cost budget or an accuracy target.

        ``correct`` and ``cost`` are (n, rungs) in ladder order: whether each rung answered
        each row correctly and what calling it cost (tokens of that attempt). ``pt``/``pik``
        are the logged signals. Thresholds are searched over quantiles of each signal
        (``levels`` per signal): jointly per rung for short ladders, one shared quantile
        for long ones. ``start`` (n,) gives a pre-generation router's first rung (hybrid).
        """
        given = [x is not None for x in (target_cost, target_accuracy, max_accuracy_drop)]
        if sum(given) != 1:
            raise ValueError("give exactly one of target_cost, target_accuracy or max_accuracy_drop")
        pt, pik, correct, cost = _check_signals(
            self.ladder, pt=pt, pik=pik, correct=correct, cost=cost, need=("pt" in self.signals, "pik" in self.signals)
        )
        if len(correct) < 10:
            raise ValueError(f"calibration needs at least 10 labelled rows, got {len(correct)}")
        if max_accuracy_drop is not None:
            target_accuracy = float(correct.mean(axis=0).max()) - max_accuracy_drop
        points = self.sweep(correct, cost, pt=pt, pik=pik, start=start, levels=levels)
        from difficulty_router.learning.policies import pick_operating_point

        point = pick_operating_point(points, "thresholds", target_cost=target_cost, target_accuracy=target_accuracy)
        self.set_thresholds(point["thresholds"])
        return point

    def sweep(self, correct, cost, *, pt=None, pik=None, start=None, levels: int = 11) -> list[dict]:
        """Accuracy and mean cost of the cascade at every threshold setting searched."""
        lower = self.ladder[:-1]
        keys = ["combined"] if self.combine == "learned" else list(self.signals)
        values = {"pt": pt, "pik": pik}
        if self.combine == "learned":
            values["combined"] = self.confidence_matrix(pt, pik)
        qs = np.linspace(0, 1, levels)
        candidates = {}
        for j, model in enumerate(lower):
            for key in keys:
                col = values[key][:, j]
                # 0 accepts everything; quantiles in between; just above the max escalates everything
                candidates[(model, key)] = np.unique(np.r_[0.0, np.quantile(col, qs[1:-1]), min(1.0, col.max() + 1e-9)])
        slots = list(candidates)
        if len(slots) * math.log(levels) > math.log(60000):  # too many combinations: share one quantile level
            grids = [
                {slot: float(np.quantile(values[slot[1]][:, lower.index(slot[0])], qmap[slot[1]])) for slot in slots}
                for qmap in (dict(zip(keys, q, strict=False)) for q in itertools.product(qs, repeat=len(keys)))
            ]
        else:
            grids = [
                dict(zip(slots, combo, strict=False)) for combo in itertools.product(*(candidates[s] for s in slots))
            ]
        points = []
        for setting in grids:
            accept = np.ones_like(correct, dtype=bool)
            for (model, key), tau in setting.items():
                accept[:, lower.index(model)] &= values[key][:, lower.index(model)] >= tau
            result = simulate(accept, correct, cost, start=start)
            thresholds: dict[str, dict[str, float]] = {}
            for (model, key), tau in setting.items():
                thresholds.setdefault(key, {})[model] = float(tau)
            points.append(
                {
                    "thresholds": thresholds,
                    "accuracy": result["accuracy"],
                    "cost": result["cost"],
                    "share": result["share"],
                    "attempts": result["attempts"],
                }
            )
        return points

    def set_thresholds(self, thresholds: Mapping[str, Mapping[str, float]]) -> None:
        for key, table in thresholds.items():
            target = {"pt": self.pt_threshold, "pik": self.pik_threshold, "combined": self.combined_threshold}[key]
            target.update({m: float(v) for m, v in table.items()})

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        out["ladder"], out["signals"] = list(self.ladder), list(self.signals)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> CascadePolicy:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"cascade policy has unknown keys {unknown} (allowed: {sorted(allowed)})")
        return cls(**data)


def _check_signals(ladder, *, pt=None, pik=None, correct=None, cost=None, need=(False, False)):
    k = len(ladder)
    out: list[np.ndarray | None] = []
    for name, arr, required in (
        ("pt", pt, need[0]),
        ("pik", pik, need[1]),
        ("correct", correct, True),
        ("cost", cost, cost is not None),
    ):
        if arr is None:
            if required:
                raise ValueError(f"{name} is required for this policy's signals")
            if name != "cost":
                out.append(None)
            continue
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != k:
            raise ValueError(f"{name} must be (n_rows, {k}) in ladder order, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        out.append(arr)
    shapes = {a.shape[0] for a in out if a is not None}
    if len(shapes) > 1:
        raise ValueError(f"signal arrays disagree on the number of rows: {sorted(shapes)}")
    return out


def simulate(accept, correct, cost, start=None) -> dict:
    """Replay a cascade on logged rows.

    Each row starts at rung ``start`` (0 without a router), takes the first accepted rung
    from there (the top rung always accepts), is correct if that rung was, and costs the
    sum of every rung it tried: failed attempts are paid for too.
    """
    accept = np.array(accept, dtype=bool)
    correct, cost = np.asarray(correct, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    n, k = correct.shape
    start = np.zeros(n, dtype=np.int64) if start is None else np.asarray(start, dtype=np.int64)
    if start.shape != (n,) or (start < 0).any() or (start >= k).any():
        raise ValueError(f"start must be (n_rows,) rung indexes in [0, {k})")
    accept[:, -1] = True
    rungs = np.arange(k)[None, :]
    open_ = accept & (rungs >= start[:, None])
    chosen = open_.argmax(axis=1)
    tried = (rungs >= start[:, None]) & (rungs <= chosen[:, None])
    rows = np.arange(n)
    return {
        "chosen": chosen,
        "accuracy": float(correct[rows, chosen].mean()),
        "cost": float((cost * tried).sum(axis=1).mean()),
        "attempts": float(tried.sum(axis=1).mean()),
        "share": np.bincount(chosen, minlength=k).tolist(),
    }


def hybrid_start(policy: CascadePolicy, probabilities: Mapping[str, float], skip_threshold: float) -> str:
    """The first rung the pre-generation router expects to succeed (P >= skip_threshold), else the top."""
    for model in policy.ladder:
        if model not in probabilities:
            raise ValueError(f"the router has no probability for rung {model!r}; its pool must include the ladder")
        if probabilities[model] >= skip_threshold:
            return model
    return policy.ladder[-1]
