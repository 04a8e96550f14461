"""``with_structured_output`` through the router: the chosen model's own native structured output.

BaseChatModel's default would turn every schema into tool calling on the router; a demanding user
asks for ``method="json_schema"`` (or ``strict=True``) and means it. So each call routes, then
calls the chosen pool model's own ``with_structured_output`` runnable, escalating like any call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from difficulty_router.calling import dispatch
from difficulty_router.calling.dispatch import Reply

from ._convert import to_router_query
from ._pool import pool_config
from ._tracing import with_record


def routed_structured_output(chat: Any, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Runnable:
    exclude = chat._exclusions({"tools": [schema]}) if kwargs.get("method") in (None, "function_calling") else {}
    parsers = {}
    for name, model in chat.models.items():
        try:
            if name not in exclude:
                parsers[name] = model.with_structured_output(schema, include_raw=include_raw, **kwargs)
        except NotImplementedError:
            exclude[name] = "no structured output"
    if not parsers:
        raise ValueError(f"none of the models {list(chat.models)} supports structured output with {kwargs}")

    def record(out: Any, call: dispatch.RoutedCall) -> Any:
        if include_raw and isinstance(out, dict) and isinstance(out.get("raw"), BaseMessage):
            out["raw"] = with_record(out["raw"], call)
        return out

    def run(value: Any, config: RunnableConfig) -> Any:
        call = chat._binding.start(chat._binding.decide(to_router_query(value), exclude), cascade=False)
        cfg = pool_config(config)
        return record(dispatch.run_sync(call, lambda n: Reply(parsers[n].invoke(value, cfg))).value, call)

    async def arun(value: Any, config: RunnableConfig) -> Any:
        decision = await asyncio.to_thread(chat._binding.decide, to_router_query(value), exclude)
        call, cfg = chat._binding.start(decision, cascade=False), pool_config(config)

        async def invoke(n: str) -> Reply:
            return Reply(await parsers[n].ainvoke(value, cfg))

        return record((await dispatch.run_async(call, invoke)).value, call)

    return RunnableLambda(run, afunc=arun, name="ChatDifficultyRouter.with_structured_output")
