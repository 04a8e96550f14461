"""DifficultySelector: a RouterQueryEngine selector that picks the choice tied to the routed tier."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.base_selector import BaseSelector, SelectorResult, SingleSelection
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.schema import QueryBundle
from llama_index.core.tools.types import ToolMetadata

from ._convert import check_router, route
from .events import DifficultyRouteEvent, dispatcher

NO_CHOICE = "no query engine choice is tied to it"


class DifficultySelector(BaseSelector):
    """Selects by the router's decision instead of asking an LLM to read tool descriptions.

    ``choice_models[i]`` is the pool name (model tier) that choice ``i`` of the
    ``RouterQueryEngine`` stands for: a cheap engine for easy questions, a thorough one for
    hard ones. Pool models tied to no choice are excluded from routing, so the router always
    lands on a choice. The reason string carries the probabilities so a trace shows why.
    """

    def __init__(self, router: Any, choice_models: Sequence[str]) -> None:
        check_router(router)
        if isinstance(choice_models, str) or not isinstance(choice_models, Sequence):
            raise TypeError(
                f"choice_models must be a list of pool names, one per choice, got {type(choice_models).__name__}"
            )
        choice_models = list(choice_models)
        if not choice_models:
            raise ValueError("choice_models is empty; give one pool name per RouterQueryEngine choice")
        unknown = [m for m in choice_models if m not in router.models]
        if unknown:
            raise ValueError(f"choice_models names {unknown}, which are not in the router's pool {router.models}")
        dupes = sorted({m for m in choice_models if choice_models.count(m) > 1})
        if dupes:
            raise ValueError(f"choice_models ties {dupes} to more than one choice; tie each tier to one choice")
        self._router = router
        self._choice_models = choice_models
        self._exclude = {m: NO_CHOICE for m in router.models if m not in choice_models}

    @property
    def choice_models(self) -> list[str]:
        return list(self._choice_models)

    def _get_prompts(self) -> PromptDictType:
        return {}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        """No prompts: the choice comes from the router, not from an LLM."""

    def _check(self, choices: Sequence[ToolMetadata], query: QueryBundle) -> None:
        if len(choices) != len(self._choice_models):
            raise ValueError(
                f"the selector was given {len(choices)} choices but ties {len(self._choice_models)} "
                f"(choice_models={self._choice_models}); give one pool name per choice, in order"
            )
        if not query.query_str or not query.query_str.strip():
            raise ValueError("the query is empty; there is nothing to route")

    def _result(self, decision: Any) -> SelectorResult:
        dispatcher.event(DifficultyRouteEvent(model=decision.model, decision=decision.to_dict(), operation="select"))
        probs = ", ".join(f"{m}={p:.2f}" for m, p in decision.probabilities.items())
        reason = (
            f"difficulty router chose {decision.model}: difficulty {decision.difficulty:.2f}/5, "
            f"P(success) {probs}; {decision.policy} {decision.parameter}={decision.parameter_value:g}, "
            f"expected cost {decision.expected_cost:.6g}"
        )
        return SelectorResult(
            selections=[SingleSelection(index=self._choice_models.index(decision.model), reason=reason)]
        )

    def _select(self, choices: Sequence[ToolMetadata], query: QueryBundle) -> SelectorResult:
        self._check(choices, query)
        return self._result(route(self._router, query.query_str, self._exclude))

    async def _aselect(self, choices: Sequence[ToolMetadata], query: QueryBundle) -> SelectorResult:
        self._check(choices, query)
        return self._result(await asyncio.to_thread(route, self._router, query.query_str, self._exclude))
