"""Turn per-model success probabilities and costs into a choice of model.

Costs are divided by the dearest model's cost for the same query, so ``lambda`` reads as
"accuracy points I would give up to save one call of the most expensive model" whatever
the currency of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICY_KINDS = ("utility", "threshold")


def normalised_costs(costs: np.ndarray) -> np.ndarray:
    costs = np.asarray(costs, dtype=np.float64)
    top = costs.max(axis=1, keepdims=True)
    return np.divide(costs, top, out=np.zeros_like(costs), where=top > 0)


@dataclass(frozen=True)
class Policy:
    """``threshold``: cheapest model with P(success) >= value, else the most capable.
    ``utility``: argmax of P(success) - value * normalised cost; with a ``margin``, a model
    other than the most capable one is chosen only when its utility beats the most capable
    one's by more than the margin. The margin is the probes' measured noise (training fits
    it on out-of-fold predictions), so at value 0 the router equals the best single model
    unless a predicted gain has proved real.
    """

    kind: str = "utility"
    value: float = 0.1
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown policy {self.kind!r}; expected one of {POLICY_KINDS}")
        if not np.isfinite(self.value) or self.value < 0:
            raise ValueError(f"policy value must be a finite non-negative number, got {self.value}")
        if self.kind == "threshold" and self.value > 1:
            raise ValueError(f"threshold tau must lie in [0, 1], got {self.value}")
        if not np.isfinite(self.margin) or not 0 <= self.margin <= 1:
            raise ValueError(f"policy margin must lie in [0, 1], got {self.margin}")

    @property
    def parameter(self) -> str:
        return "tau" if self.kind == "threshold" else "lambda"

    def with_value(self, value: float) -> Policy:
        return Policy(self.kind, float(value), self.margin)

    def choose(
        self, proba: np.ndarray, costs: np.ndarray, capability: np.ndarray, eligible: np.ndarray | None = None
    ) -> np.ndarray:
        """Index of the chosen model per row.

        ``capability`` ranks models (higher = more capable, from training accuracy);
        ``eligible`` (n, m) bool masks out models that cannot serve a row (e.g. no tool calling).
        """
        proba = np.asarray(proba, dtype=np.float64)
        costs = normalised_costs(costs)
        n, m = proba.shape
        if eligible is None:
            eligible = np.ones((n, m), dtype=bool)
        if not eligible.any(axis=1).all():
            raise ValueError("a query has no eligible model to route to")
        if self.kind == "utility":
            utility = proba - self.value * costs
            # ties (equal utility) go to the cheaper model
            utility = np.where(eligible, utility - 1e-12 * costs, -np.inf)
            chosen = utility.argmax(axis=1)
            if self.margin > 0:
                rows = np.arange(n)
                anchor = np.where(eligible, capability[None, :], -np.inf).argmax(axis=1)
                stay = utility[rows, chosen] - utility[rows, anchor] <= self.margin
                chosen = np.where(stay, anchor, chosen)
            return chosen
        order = np.argsort(costs + 1e-9 * (1 - capability / max(capability.max(), 1)), axis=1, kind="stable")
        chosen = np.empty(n, dtype=np.int64)
        strongest = np.where(eligible, capability[None, :], -np.inf).argmax(axis=1)
        for i in range(n):
            chosen[i] = strongest[i]
            for j in order[i]:
                if eligible[i, j] and proba[i, j] >= self.value:
                    chosen[i] = j
                    break
        return chosen

    def grid(self) -> np.ndarray:
        """Operating points swept by calibration and evaluation, cheapest-leaning last."""
        if self.kind == "threshold":
            return np.linspace(0.0, 1.0, 201)
        return np.r_[0.0, np.logspace(-4, 2, 240)]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "margin": self.margin}

    @classmethod
    def from_point(cls, kind: str, point: dict) -> Policy:
        """The policy at one point of a :func:`sweep`."""
        return cls(kind, float(point["tau" if kind == "threshold" else "lambda"]), float(point.get("margin", 0.0)))

    @classmethod
    def from_dict(cls, data: dict) -> Policy:
        return cls(kind=data["kind"], value=float(data["value"]), margin=float(data.get("margin", 0.0)))


#: margins tried by :func:`fit_margin`; 1 means "never leave the most capable model at value 0"
MARGINS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def paired_gain(diff: np.ndarray) -> tuple[float, float]:
    """Mean of row-by-row accuracy differences and its 95% lower bound (normal approximation; -inf for one row)."""
    gain = float(np.mean(diff))
    n = len(diff)
    return gain, gain - 1.96 * float(np.std(diff, ddof=1)) / np.sqrt(n) if n > 1 else -np.inf


def fit_margin(proba, correct, costs, capability, eligible=None) -> tuple[float, list[dict]]:
    """The margin a utility policy needs before leaving the most capable model, from out-of-fold predictions.

    For each candidate margin, the accuracy-seeking router (value 0) is compared row by row
    with always calling the most capable model. Margins whose deviations gain accuracy with
    a 95% lower bound above zero qualify and the one with the largest gain wins; if none
    does, the margin is 1 and the router at value 0 *is* the best single model.
    """
    correct = np.asarray(correct, dtype=np.float64)
    n = len(correct)
    rows = np.arange(n)
    eligible = np.ones(correct.shape, dtype=bool) if eligible is None else eligible
    anchor = np.where(eligible, np.asarray(capability)[None, :], -np.inf).argmax(axis=1)
    table, best = [], (1.0, 0.0)
    for margin in MARGINS:
        chosen = Policy("utility", 0.0, margin).choose(proba, costs, capability, eligible)
        gain, low = paired_gain(correct[rows, chosen] - correct[rows, anchor])
        table.append({"margin": margin, "deviations": int((chosen != anchor).sum()), "gain": gain, "gain_low95": low})
        if (chosen != anchor).any() and low > 0 and gain > best[1]:
            best = (margin, gain)
    return best[0], table


def dominated(accuracy, cost, names, keep=()) -> dict[str, str]:
    """Models another model beats on both accuracy and cost (at least as good on both, better on one).

    Returned as name -> reason; models in ``keep`` are never listed.
    """
    accuracy, cost = np.asarray(accuracy, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    out = {}
    for j, name in enumerate(names):
        if name in keep:
            continue
        for k, other in enumerate(names):
            if (
                k != j
                and accuracy[k] >= accuracy[j]
                and cost[k] <= cost[j]
                and (accuracy[k] > accuracy[j] or cost[k] < cost[j])
            ):
                out[name] = (
                    f"dominated in training by {other}: accuracy {accuracy[k]:.3f} >= {accuracy[j]:.3f} "
                    f"at cost {cost[k]:.3g} <= {cost[j]:.3g}"
                )
                break
    return out


def complementary(proba, correct, costs, capability, dropped, names) -> dict[str, str]:
    """Dropped models that out-of-fold evidence says are worth routing to after all, as name -> reason.

    A model worse on average and dearer than another can still be right where the others are wrong
    on queries the predictor recognises. Each dropped model (most capable first) is re-admitted if, at
    some margin of :data:`MARGINS`, the accuracy-seeking utility router with it eligible beats the same
    router without it row by row, with a 95% lower bound above zero (:func:`paired_gain`, the test
    :func:`fit_margin` uses for leaving the best model). Predictions must be out-of-fold, or the test is
    fooled by overfitting.
    """
    correct = np.asarray(correct, dtype=np.float64)
    n, m = correct.shape
    if n < 2:
        return {}
    rows = np.arange(n)
    capability = np.asarray(capability, dtype=np.float64)
    admitted = np.array([name not in dropped for name in names])
    out = {}
    for j in sorted((names.index(d) for d in dropped), key=lambda j: -capability[j]):
        with_j = admitted.copy()
        with_j[j] = True
        for margin in MARGINS:
            policy = Policy("utility", 0.0, margin)
            base = policy.choose(proba, costs, capability, np.broadcast_to(admitted, (n, m)))
            chosen = policy.choose(proba, costs, capability, np.broadcast_to(with_j, (n, m)))
            gain, low = paired_gain(correct[rows, chosen] - correct[rows, base])
            if low > 0:
                out[names[j]] = (
                    f"kept although dominated on average: out of fold it is chosen on {int((chosen == j).sum())} "
                    f"of {n} rows and gains {gain:+.3f} accuracy (95% lower bound {low:+.3f}) at margin {margin:g}"
                )
                admitted = with_j
                break
    return out


def sweep(policy: Policy, proba, costs, capability, correct, realised_costs=None, eligible=None) -> list[dict]:
    """Accuracy and mean cost at every operating point of ``policy`` on labelled rows.

    A utility sweep ends with the point (value 0, margin 1) that always calls the most
    capable eligible model, so every curve can match the best single model at its cost.
    Each point carries its setting (``lambda`` and ``margin``, or ``tau``).
    """
    correct = np.asarray(correct, dtype=np.float64)
    realised = np.asarray(costs if realised_costs is None else realised_costs, dtype=np.float64)
    points = []
    for value in policy.grid():
        setting = policy.with_value(value)
        points.append(_point(setting, setting.choose(proba, costs, capability, eligible), correct, realised))
    if policy.kind == "utility" and policy.margin < 1.0:
        # the accuracy-seeking end of every utility curve: always the most capable eligible model
        stay = Policy("utility", 0.0, 1.0)
        points.append(_point(stay, stay.choose(proba, costs, capability, eligible), correct, realised))
    return points


def _point(policy: Policy, chosen: np.ndarray, correct: np.ndarray, realised: np.ndarray) -> dict:
    rows = np.arange(len(correct))
    point = {
        policy.parameter: float(policy.value),
        "accuracy": float(correct[rows, chosen].mean()),
        "cost": float(realised[rows, chosen].mean()),
        "share": np.bincount(chosen, minlength=correct.shape[1]).tolist(),
    }
    if policy.kind == "utility":
        point["margin"] = float(policy.margin)
    return point


def pick_operating_point(
    points: list[dict], parameter: str, *, target_cost: float | None = None, target_accuracy: float | None = None
) -> dict:
    """The best point under a cost budget, or the cheapest point reaching an accuracy."""
    if (target_cost is None) == (target_accuracy is None):
        raise ValueError("give exactly one of target_cost or target_accuracy")
    if target_cost is not None:
        feasible = [p for p in points if p["cost"] <= target_cost + 1e-12]
        if not feasible:
            cheapest = min(p["cost"] for p in points)
            raise ValueError(f"no operating point costs <= {target_cost:g} per query; the cheapest costs {cheapest:g}")
        return max(feasible, key=lambda p: (p["accuracy"], -p["cost"]))
    assert target_accuracy is not None
    feasible = [p for p in points if p["accuracy"] >= target_accuracy - 1e-12]
    if not feasible:
        best = max(p["accuracy"] for p in points)
        raise ValueError(f"no operating point reaches accuracy {target_accuracy:.4f}; the best reaches {best:.4f}")
    return min(feasible, key=lambda p: (p["cost"], -p["accuracy"]))
