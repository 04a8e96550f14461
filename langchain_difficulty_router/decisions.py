"""``DifficultyDecisionModel``: the router as a LangChain decision model (``langchain_core.decisions``).

Anything that consumes a ``BaseDecisionModel`` (for example
``langchain.agents.middleware.ModelRouterMiddleware(choices=..., instructions=..., classifier=...)``)
can use the router with no glue. It answers from the router's calibrated P(success) per pool model
(the arithmetic is the core's :mod:`difficulty_router.calling.answers`, documented there):

- ``Choice`` whose labels are pool models (or mapped to them with ``routes=``): ``choice`` is the
  router's decision (the session's model under a session policy); ``probabilities`` is
  P(the label is the cheapest offered model that answers correctly), assuming independent
  successes, the all-fail mass on the most capable offered model; ``confidence`` is the router's
  P(success) of the chosen model: how sure it is that the pick answers, not how sure it is that
  no cheaper model would. Pool models not offered as labels are excluded from the decision.
- ``Score``: the router's 1-5 difficulty on the question's rubric (first criterion = 1, last = 5,
  linearly in between), with a distribution whose expected level is that difficulty;
  ``confidence`` is the most likely level's probability.
- ``Noul``: P(the cheapest pool model answers wrongly).

The router answers these three things whatever the question's wording: ``instructions`` and
criteria descriptions are not read (a ``Noul`` asking "is this urgent?" still gets P(the cheapest
model fails)). ``Box`` questions are refused. The query is read from the state the way
:class:`~langchain_difficulty_router.ChatDifficultyRouter` reads its input: a string, a message, a
message list, or a mapping with ``"messages"`` (the agent state); any other mapping is routed as
its JSON text.

Sessions: with ``sessions=`` (a core ``Sessions`` or a policy name), a ``Choice`` is decided for
the session named by the run's ``configurable`` ``session_id`` or ``thread_id``, so under
``sticky`` the agent runs of one thread stay on one model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.decisions import (
    BaseDecisionModel,
    Box,
    Choice,
    ChoiceAnswer,
    ClassifierResponse,
    Noul,
    NoulAnswer,
    Question,
    Score,
    ScoreAnswer,
    State,
)
from langchain_core.messages import BaseMessage
from langchain_core.runnables.config import ensure_config
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from difficulty_router.calling import answers
from difficulty_router.calling.dispatch import Binding
from difficulty_router.routing.session_keys import as_sessions, config_session_key, decide_in_session

from ._convert import to_router_query

NOT_OFFERED = "not offered as a choice"


def state_query(state: State) -> str | list[dict]:
    """The router's query for a decision model's state (see the module docstring)."""
    if isinstance(state, str | BaseMessage):
        return to_router_query(state)
    if isinstance(state, Mapping):
        if "messages" in state:
            return state_query(state["messages"])  # type: ignore[arg-type]
        return json.dumps(state, default=str, ensure_ascii=False)
    if isinstance(state, Sequence) and not isinstance(state, bytes | bytearray):
        return to_router_query(list(state))
    raise TypeError(
        f"cannot route a decision state of type {type(state).__name__}; expected a string, a message, "
        "a list of messages or a mapping (with 'messages', or JSON)"
    )


class DifficultyDecisionModel(BaseDecisionModel):
    """A ``BaseDecisionModel`` answering from a trained ``difficulty_router.DifficultyRouter``.

    Args:
        router: the trained router.
        routes: ``{label: pool model}`` for ``Choice`` labels that are not pool model names
            (e.g. ``{"fast": "gpt-4o-mini", "powerful": "gpt-4o"}``).
        sessions: a ``difficulty_router.routing.sessions.Sessions`` or a policy name ("per_call", "sticky",
            "cache_aware"); ``Choice`` answers then follow the session of the run's
            ``configurable`` ``session_id`` (or ``thread_id``).
    """

    model: str = "difficulty-router"
    router: Any = Field(exclude=True)
    routes: dict[str, str] = Field(default_factory=dict)
    sessions: Any = Field(default=None, exclude=True)

    model_config = ConfigDict(arbitrary_types_allowed=True)
    _binding: Binding = PrivateAttr()
    _sessions: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _bind(self) -> DifficultyDecisionModel:
        if not callable(getattr(self.router, "route", None)) or not isinstance(
            getattr(self.router, "models", None), list
        ):
            raise TypeError(f"router must be a difficulty_router.DifficultyRouter, got {type(self.router).__name__}")
        unknown = {label: m for label, m in self.routes.items() if m not in self.router.models}
        if unknown:
            raise ValueError(
                f"routes= maps labels to {unknown}, which are not in the router's pool {self.router.models}"
            )
        self._sessions = as_sessions(self.sessions)
        self._binding = Binding(self.router.models, router=self.router, sessions=self._sessions)
        return self

    @property
    def _provider(self) -> str:
        return "difficulty_router"

    def _pool_model(self, label: str) -> str:
        if label in self.routes:
            return self.routes[label]
        if label in self.router.models:
            return label
        raise ValueError(
            f"the choice label {label!r} is neither a pool model {self.router.models} nor mapped by "
            f"routes= {self.routes}; give routes={{label: pool model}}"
        )

    def _offered(self, question: Choice) -> dict[str, str]:
        """``{pool model: label}`` for a Choice's labels."""
        offered: dict[str, str] = {}
        for label in question.criteria:
            model = self._pool_model(label)
            if model in offered:
                raise ValueError(
                    f"the choice labels {offered[model]!r} and {label!r} both name the pool model {model!r}"
                )
            offered[model] = label
        return offered

    def _classify(self, state: State, questions: dict[str, Question]) -> ClassifierResponse:
        if not questions:
            raise ValueError("a decision request needs at least one question")
        query = state_query(state)
        choices = {qid: self._offered(q) for qid, q in questions.items() if isinstance(q, Choice)}
        boxes = [qid for qid, q in questions.items() if isinstance(q, Box)]
        if boxes:
            raise ValueError(f"the difficulty router cannot answer Box questions ({boxes}): it reads text, not images")
        model_sets = {frozenset(offered) for offered in choices.values()}
        if len(model_sets) > 1:
            raise ValueError(
                "every Choice question of one request must offer the same pool models (one routing decision "
                f"answers them all); got {[sorted(s) for s in model_sets]}"
            )
        exclude = None
        key = None
        if model_sets:
            offered_models = next(iter(model_sets))
            exclude = {m: NOT_OFFERED for m in self.router.models if m not in offered_models} or None
            key = config_session_key(ensure_config())
        decision = decide_in_session(self._binding, query, exclude, key)
        order = self.router.capability_order()
        out: dict[str, Any] = {}
        for qid, question in questions.items():
            if isinstance(question, Choice):
                offered = choices[qid]
                dist = answers.choice_distribution(decision, order, list(offered))
                out[qid] = ChoiceAnswer(
                    type="choice",
                    choice=offered[decision.model],
                    probabilities={offered[m]: p for m, p in dist.items()},
                    confidence=float(decision.probabilities[decision.model]),
                )
            elif isinstance(question, Score):
                levels = answers.difficulty_distribution(
                    decision, len(question.criteria), derived=getattr(self.router, "difficulty_probe", None) is None
                )
                out[qid] = ScoreAnswer(
                    type="score",
                    score=answers.expected_level(levels),
                    legend=dict(enumerate(question.criteria)),
                    probabilities=levels,
                    confidence=max(levels.values()),
                )
            elif isinstance(question, Noul):
                out[qid] = NoulAnswer(type="noul", noul=answers.cheapest_failure(decision, order))
            else:  # pragma: no cover - Question is a closed union
                raise TypeError(f"unknown question type {type(question).__name__}")
        return ClassifierResponse(model=self.model, answers=out)
