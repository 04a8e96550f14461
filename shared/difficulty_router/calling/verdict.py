"""The verdict a routed call takes on each answer: accept it, or move up the ladder.

A routed call walks its ladder and owns where it stands; what it does not know is whether an
answer is good enough. That is a policy it is given: plain routing accepts every answer
(:class:`AcceptAnswer`), a cascade judges each rung's confidence (:class:`CascadeVerdict`, over a
:class:`~difficulty_router.calling.cascade_policy.CascadePolicy`). Both turn a
:class:`~difficulty_router.calling.attempt.Reply` into a priced
:class:`~difficulty_router.calling.attempt.Attempt` and keep no state of their own, so the cascade
needs nothing from the call that drives it.
"""

from __future__ import annotations

from typing import Protocol

from difficulty_router.calling.attempt import Attempt, CostFn, Reply, price
from difficulty_router.calling.cascade_policy import CascadePolicy
from difficulty_router.calling.confidence import answer_confidence


class Verdict(Protocol):
    """Judges one model's reply into an attempt (accepted or not)."""

    @property
    def buffered(self) -> bool:
        """Must a stream be read whole before the verdict (rather than committed at its first chunk)?"""
        ...

    def judge(self, model: str, reply: Reply, pik: float | None = None) -> Attempt: ...


class AcceptAnswer:
    """Plain routing: the answer is accepted as it is, and priced."""

    buffered = False

    def __init__(self, cost_fn: CostFn | None = None) -> None:
        self.cost_fn = cost_fn

    def judge(self, model: str, reply: Reply, pik: float | None = None) -> Attempt:
        return Attempt(
            model,
            reply.text,
            accepted=True,
            reason="answered",
            prompt_tokens=int(reply.prompt_tokens),
            completion_tokens=int(reply.completion_tokens),
            cost=price(self.cost_fn, model, reply.prompt_tokens, reply.completion_tokens),
        )


class CascadeVerdict:
    """A cascade rung's answer is accepted when the policy trusts its confidence: P(T) from the
    answer's log-probabilities, P(IK) as given (the rung's own probe, or a scorer)."""

    buffered = True

    def __init__(self, policy: CascadePolicy, cost_fn: CostFn | None = None) -> None:
        if not isinstance(policy, CascadePolicy):
            raise TypeError(f"cascade must be a difficulty_router.CascadePolicy, got {type(policy).__name__}")
        self.policy = policy
        self.cost_fn = cost_fn

    def judge(self, model: str, reply: Reply, pik: float | None = None) -> Attempt:
        pt = answer_confidence(reply.logprobs, self.policy.reduce, reply.tokens) if reply.logprobs else None
        accepted, reason = self.policy.decide(model, pt, pik if self.policy.needs_pik else None)
        return Attempt(
            model,
            reply.text,
            pt,
            pik,
            accepted,
            reason,
            int(reply.prompt_tokens),
            int(reply.completion_tokens),
            price(self.cost_fn, model, reply.prompt_tokens, reply.completion_tokens),
        )
