"""One try at one model: what came back (:class:`Reply`), what the call made of it (:class:`Attempt`),
that attempt in the record's schema, and its price.

These are the plain data every part of a routed call speaks (the verdicts judge a :class:`Reply`
into an :class:`Attempt`, the routed call keeps the attempts, the front ends read the record), so
they sit below all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CostFn = Callable[[str, int, int], float]
"""``cost_fn(model, prompt_tokens, completion_tokens)``: what one attempt cost."""


@dataclass
class Reply:
    """One model's answer in the core's terms; ``value`` is the front end's own object, untouched."""

    value: Any
    text: str = ""
    tokens: list[str] | None = None
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pik: float | None = None  # a local rung's own P(IK), when its generation computed one
    deferred: bool = False  # a stream committed at its first chunk: the attempt ends when the stream does


@dataclass
class Attempt:
    """One rung's try: its answer, both signals, the verdict and what it cost."""

    model: str
    text: str
    pt: float | None = None
    pik: float | None = None
    accepted: bool = False
    reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    error: str | None = None
    latency_ms: float = 0.0


def attempt_record(attempt: Attempt) -> dict[str, Any]:
    """One attempt in the record's schema."""
    outcome = "accepted" if attempt.accepted else ("failed" if attempt.error is not None else "rejected")
    return {
        "model": attempt.model,
        "outcome": outcome,
        "reason": attempt.reason,
        "error": attempt.error,
        "text": attempt.text,
        "pt": attempt.pt,
        "pik": attempt.pik,
        "prompt_tokens": attempt.prompt_tokens,
        "completion_tokens": attempt.completion_tokens,
        "cost": attempt.cost,
        "latency_ms": round(attempt.latency_ms, 3),
    }


def pool_cost_fn(pool: Any) -> CostFn:
    """Price an attempt from its real token counts with a :class:`ModelPool`'s prices."""

    def cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
        entry = pool[model]
        if entry.cost_per_query is not None:
            return float(entry.cost_per_query)
        return (prompt_tokens * entry.input_cost_per_1m + completion_tokens * entry.output_cost_per_1m) / 1e6

    return cost


def price(cost_fn: CostFn | None, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """What an attempt cost under ``cost_fn`` (0 without one)."""
    return float(cost_fn(model, prompt_tokens, completion_tokens)) if cost_fn is not None else 0.0
