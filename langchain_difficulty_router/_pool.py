"""What the router reads from, and passes to, the LangChain pool models it wraps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableConfig

_CONFIG_KEYS = ("tags", "metadata", "configurable", "run_name", "recursion_limit", "max_concurrency")


def can_call_tools(model: Any) -> bool:
    """By default a pool model calls tools if it implements ``bind_tools`` and its profile does not deny it."""
    if isinstance(model, BaseChatModel):
        if type(model).bind_tools is BaseChatModel.bind_tools:
            return False
        return (getattr(model, "profile", None) or {}).get("tool_calling", True) is not False
    return callable(getattr(model, "bind_tools", None))


def tool_capability(models: Mapping[str, Any], overrides: Mapping[str, bool]) -> dict[str, bool]:
    """Whether each pool model can call tools: the ``tool_calling=`` override, else :func:`can_call_tools`."""
    unknown = sorted(set(overrides) - set(models))
    if unknown:
        raise ValueError(f"tool_calling= names {unknown}, which are not in the router's pool {list(models)}")
    return {name: overrides.get(name, can_call_tools(model)) for name, model in models.items()}


def pool_config(config: Any) -> RunnableConfig:
    """The caller's config for a pool model, minus callbacks (the router reports the call once)."""
    config = config or {}
    out: dict[str, Any] = {k: config[k] for k in _CONFIG_KEYS if k in config}
    out["callbacks"] = []
    return out  # type: ignore[return-value]


def merged_profile(profiles: list[Any]) -> Any:
    """What the router can promise: a capability every pool model has (tool calling: any one, since
    calls with tools are routed to those that can), the smallest limits."""
    if not profiles or any(not p for p in profiles):
        return None
    merged: dict[str, Any] = {}
    for key in set.intersection(*(set(p) for p in profiles)):
        values = [p[key] for p in profiles]
        if all(isinstance(v, bool) for v in values):
            merged[key] = any(values) if key == "tool_calling" else all(values)
        elif all(isinstance(v, int) for v in values):
            merged[key] = min(values)
    return merged or None
