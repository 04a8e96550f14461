"""What the router decided for one query, in a form adapters can log and serialise."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RouteDecision:
    """The chosen model and the evidence behind it.

    ``fallbacks`` lists the eligible models more capable than ``model``, in the order an
    adapter should escalate to when the chosen model fails; ``skipped`` maps models that
    were not eligible for this call to the reason (for example "cannot call tools").
    ``novelty`` places the query's read-out among the training read-outs (percentile, 0-100;
    None for routers saved without a novelty score); ``ood`` is True when that was above the
    router's threshold and the query went to the most capable model for it. ``session`` is set
    when a :class:`~difficulty_router.routing.sessions.Sessions` policy decided this turn (it may have
    kept the session's model rather than the per-call choice). ``transfer`` is the transfer guard's
    verdict when the router has one (:mod:`difficulty_router.learning.transfer_guard`); when its
    ``fallback`` is True the query went to the most capable model and ``reason`` says why.
    """

    model: str
    probabilities: dict[str, float]
    difficulty: float
    difficulty_level: int
    expected_cost: float
    costs: dict[str, float]
    policy: str
    parameter: str
    parameter_value: float  # tau under the threshold policy, lambda under the utility policy
    fallbacks: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    truncated: bool = False
    latency_ms: float = 0.0
    novelty: float | None = None
    ood: bool = False
    capability_order: tuple[str, ...] = ()  # the pool from least to most capable (session policies rank by it)
    output_tokens: dict[str, float] | None = None  # predicted output tokens per model, when the router has a head
    session: dict | None = None  # what a session policy did to this turn (sessions.Sessions.apply), else None
    transfer: dict | None = None  # the transfer guard's verdict (state, fallback, reason, window statistics), else None

    @property
    def probability(self) -> float:
        return self.probabilities[self.model]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fallbacks"] = list(self.fallbacks)
        out["capability_order"] = list(self.capability_order)
        return out

    def __str__(self) -> str:
        probs = ", ".join(f"{m}={p:.2f}" for m, p in self.probabilities.items())
        ood = f"; out of distribution, novelty percentile {self.novelty:.1f}" if self.ood else ""
        if self.transfer is not None and self.transfer.get("fallback"):
            ood += "; transfer guard fallback"
        return (
            f"-> {self.model} (difficulty {self.difficulty:.1f}/5, P(success): {probs}; "
            f"{self.policy} {self.parameter}={self.parameter_value:g}, expected cost {self.expected_cost:.6g}{ood})"
        )
