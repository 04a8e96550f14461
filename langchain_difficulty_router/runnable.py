"""``DifficultyRouterRunnable``: the routing step of an LCEL chain, for ``RouterRunnable``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import run_in_executor
from langchain_core.runnables.router import RouterRunnable

from ._convert import to_router_query


class DifficultyRouterRunnable(Runnable[Any, dict]):
    """Emits ``{"key": <pool model>, "input": <the input, unchanged>}`` for ``RouterRunnable``.

    ``runnables`` (a mapping or the names the downstream ``RouterRunnable`` will hold) is
    checked against the router's pool at construction, so a pool model without a runnable
    fails here rather than on the first query the router happens to send to it.
    ``batch`` routes the whole batch with one extraction.
    """

    def __init__(
        self,
        router: Any,
        *,
        runnables: Mapping[str, Any] | Iterable[str] | None = None,
        exclude: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        if not hasattr(router, "route_batch") or not hasattr(router, "models"):
            raise TypeError(f"router must be a difficulty_router.DifficultyRouter, got {type(router).__name__}")
        self.router = router
        self.exclude = dict(exclude or {})
        self.name = name or "DifficultyRouterRunnable"
        unknown = sorted(set(self.exclude) - set(router.models))
        if unknown:
            raise ValueError(f"exclude names {unknown}, which are not in the router's pool {router.models}")
        if runnables is not None:
            keys = set(runnables.keys() if isinstance(runnables, Mapping) else runnables)
            missing = [m for m in router.models if m not in keys and m not in self.exclude]
            if missing:
                raise ValueError(
                    f"the router can choose {missing}, but no runnable is registered under "
                    f"{'that name' if len(missing) == 1 else 'those names'} (registered: {sorted(keys)})"
                )

    def _route(self, inputs: list[Any]) -> list[dict]:
        queries = [to_router_query(x) for x in inputs]
        decisions = self.router.route_batch(queries, exclude=self.exclude or None, progress=False)
        return [{"key": d.model, "input": x} for d, x in zip(decisions, inputs, strict=False)]

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        return self._call_with_config(lambda x: self._route([x])[0], input, config, run_type="chain")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        async def route(x):
            return (await run_in_executor(None, self._route, [x]))[0]

        return await self._acall_with_config(route, input, config, run_type="chain")

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[dict]:
        if not inputs:
            return []
        return self._batch_with_config(
            lambda xs: self._route(list(xs)),  # type: ignore[arg-type]
            inputs,
            config,
            return_exceptions=return_exceptions,
            run_type="chain",
        )

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[dict]:
        if not inputs:
            return []

        async def route(xs):
            return await run_in_executor(None, self._route, list(xs))

        return await self._abatch_with_config(
            route, inputs, config, return_exceptions=return_exceptions, run_type="chain"
        )


def route_to(router: Any, runnables: Mapping[str, Runnable], *, exclude: Mapping[str, str] | None = None) -> Runnable:
    """``DifficultyRouterRunnable(router) | RouterRunnable(runnables)``, with the names checked."""
    return DifficultyRouterRunnable(router, runnables=runnables, exclude=exclude) | RouterRunnable(  # type: ignore[operator]
        runnables=dict(runnables)
    )
