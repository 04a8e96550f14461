"""Routing decided before LangChain's chat-model run starts, handed to ``_generate``/``_stream``.

``invoke``/``stream``/``batch`` route first, so the run's tracing parameters can name the pool
model that will serve it, and the caller's config reaches that model. The decision travels in a
context variable, not in invocation kwargs: kwargs are traced and are part of the LLM cache key,
which a per-call token would make unique.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from langchain_core.callbacks import CallbackManager
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config


@dataclass
class Prepared:
    """What ``invoke``/``stream``/``batch`` settle before the chat-model run starts: the decision
    (so ``_get_ls_params`` can name the model), the caller's config, and the run's parent handle."""

    owner: Any
    decision: Any = None
    config: Any = None
    parent: Any = None


PREPARED: ContextVar[Prepared | None] = ContextVar("difficulty_router_prepared", default=None)




def prepare(owner: Any, decision: Any, config: RunnableConfig | None) -> tuple[Prepared, RunnableConfig]:
    """The prepared call and the config to run with: its run id fixed so ``_stream`` (which
    ``BaseChatModel.stream`` hands no run manager) can parent its attempts' runs."""
    config = ensure_config(config)
    run_id = config.get("run_id") or uuid.uuid4()
    parent = CallbackManager.configure(config.get("callbacks"), owner.callbacks, owner.verbose, config.get("tags"),
                                       owner.tags, config.get("metadata"), owner.metadata)
    handle = SimpleNamespace(run_id=run_id, inheritable_handlers=parent.inheritable_handlers,
                             inheritable_tags=parent.inheritable_tags, inheritable_metadata=parent.inheritable_metadata)
    return Prepared(owner, decision, config, handle), {**config, "run_id": run_id}


def take(owner: Any) -> Prepared | None:
    """The call ``owner`` prepared, read once (at the start of its ``_generate``/``_stream``)."""
    prepared = PREPARED.get()
    if prepared is not None and prepared.owner is owner:
        PREPARED.set(None)
        return prepared
    return None
