"""A routing decision read as answers to typed questions: which model, how hard, will the cheapest fail.

Decision-model front ends (LangChain's ``BaseDecisionModel``) ask a router three kinds of
question. The router's evidence is one calibrated P(success) per pool model, so each answer is
computed from those probabilities, treating the models' successes on a query as independent
events (the probes are trained per model; their errors are not modelled jointly):

- **Which model** (a choice distribution): P(model j is the *cheapest model that answers
  correctly*) = p_j * prod over cheaper models k of (1 - p_k). The mass left when every model
  fails, prod (1 - p_k), goes to the most capable model, where the router escalates a query no
  cheaper model answers. It sums to 1 and is the oracle router's pick under the probes'
  uncertainty. The served label is the router's own decision (its policy weighs cost too), so
  it need not be the most probable label.
- **How hard** (a distribution over an ordinal rubric): the router's 1-5 difficulty placed on a
  rubric of ``n`` levels (level 0 = difficulty 1, level n-1 = difficulty 5). When the router derives
  difficulty from the probabilities (1 + 4 x the expected share of pool models that fail), the
  distribution is that of the share that fails (Poisson-binomial), each share split linearly
  between its two neighbouring levels; with a trained difficulty probe (a point estimate) the
  estimate is split between its two neighbouring levels. Either way the expected level equals
  the router's difficulty exactly.
- **Will the cheapest fail**: 1 - P(success) of the cheapest pool model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from difficulty_router.routing.decision import RouteDecision


def cost_order(
    decision: RouteDecision, capability_order: Sequence[str], models: Sequence[str] | None = None
) -> list[str]:
    """``models`` (default: every model the decision priced) from cheapest to dearest for this query;
    equal costs go to the less capable model first."""
    names = list(decision.costs) if models is None else list(models)
    unknown = [m for m in names if m not in decision.costs]
    if unknown:
        raise ValueError(f"models {unknown} are not in the decision's pool {list(decision.costs)}")
    rank = {m: i for i, m in enumerate(capability_order)}
    return sorted(names, key=lambda m: (decision.costs[m], rank.get(m, len(rank))))


def choice_distribution(
    decision: RouteDecision, capability_order: Sequence[str], models: Sequence[str] | None = None
) -> dict[str, float]:
    """P(each of ``models`` is the cheapest one that answers correctly), the all-fail mass on the
    most capable of them; sums to 1. ``models`` defaults to the whole pool."""
    order = cost_order(decision, capability_order, models)
    if not order:
        raise ValueError("a choice needs at least one model")
    out: dict[str, float] = {}
    all_cheaper_fail = 1.0
    for name in order:
        p = float(np.clip(decision.probabilities[name], 0.0, 1.0))
        out[name] = all_cheaper_fail * p
        all_cheaper_fail *= 1.0 - p
    rank = {m: i for i, m in enumerate(capability_order)}
    strongest = max(order, key=lambda m: (rank.get(m, -1), decision.costs[m]))
    out[strongest] += all_cheaper_fail
    return out


def _poisson_binomial(probabilities: Sequence[float]) -> np.ndarray:
    """P(exactly k of the independent events happen), k = 0..n."""
    dist = np.array([1.0])
    for p in probabilities:
        dist = np.convolve(dist, [1.0 - p, p])
    return dist


def _split(position: float, levels: int, weight: float, into: np.ndarray) -> None:
    """Add ``weight`` at a fractional rubric position, shared linearly by its two neighbours."""
    low = int(np.floor(position))
    high = min(low + 1, levels - 1)
    frac = position - low
    into[low] += weight * (1.0 - frac)
    if frac > 0:
        into[high] += weight * frac


def difficulty_distribution(decision: RouteDecision, levels: int = 5, *, derived: bool = True) -> dict[int, float]:
    """The router's 1-5 difficulty as a distribution over ``levels`` zero-based rubric levels.

    ``derived``: the router computed difficulty from its probabilities (no difficulty probe), so
    the share of pool models that fail gives the spread; otherwise the point estimate is split
    between its neighbouring levels. The expected level is ``(difficulty - 1) / 4 * (levels - 1)``.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"a difficulty rubric needs at least 2 levels, got {levels!r}")
    out = np.zeros(levels)
    top = levels - 1
    if derived:
        fail = [1.0 - float(np.clip(p, 0.0, 1.0)) for p in decision.probabilities.values()]
        share = _poisson_binomial(fail)
        m = len(fail)
        for k, weight in enumerate(share):
            _split(top * k / m, levels, float(weight), out)
    else:
        _split(top * (float(np.clip(decision.difficulty, 1.0, 5.0)) - 1.0) / 4.0, levels, 1.0, out)
    out /= out.sum()
    return {i: float(w) for i, w in enumerate(out)}


def expected_level(distribution: Mapping[int, float]) -> float:
    return float(sum(level * weight for level, weight in distribution.items()))


def cheapest_failure(decision: RouteDecision, capability_order: Sequence[str]) -> float:
    """P(the cheapest pool model for this query answers wrongly)."""
    cheapest = cost_order(decision, capability_order)[0]
    return float(1.0 - np.clip(decision.probabilities[cheapest], 0.0, 1.0))
