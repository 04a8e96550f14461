"""One routed call, whatever the front end: which model to try next, when to give up, what happened.

Every front end (the LangChain chat model, the LlamaIndex LLM, the OpenAI-compatible server
and the core :class:`~difficulty_router.Cascade`) does the same thing per call: walk a ladder
of models, call one, and either accept its answer or move on. Plain routing is the ladder
``[decision.model, *decision.fallbacks]`` whose rungs are accepted unless they fail; a cascade
judges each rung's confidence (the verdict the call takes, :mod:`difficulty_router.calling.verdict`).
That walk lives here once, in four parts:

- :mod:`.binding`: :class:`Binding` checks, once, that a router and/or cascade fit the models
  given to serve them (pool names, ladder, P(IK) scorers, tool capability) and starts a
  :class:`RoutedCall` per call;
- :mod:`.routed_call`: :class:`RoutedCall` is the state machine: where the call stands on its
  ladder, retries with backoff, and the per-attempt record in one schema;
- :mod:`.drivers`: :func:`run_sync` / :func:`run_async` drive it, calling the model it names
  and the front end's tracing :class:`Hooks`;
- :mod:`.streams`: :func:`stream_sync` / :func:`stream_async` open streams in its two modes
  (commit on the first chunk, or after the call's :class:`StreamHoldback` (:mod:`.holdback`);
  or buffer until accepted).

This package's namespace is what front ends use; they keep only framework conversion, calling
a model, and their hooks.
"""

from difficulty_router.calling.attempt import Attempt, Reply, attempt_record
from difficulty_router.calling.dispatch.binding import (
    CANNOT_CALL_TOOLS,
    Binding,
    check_pool,
    escalation_rule,
    new_query_id,
)
from difficulty_router.calling.dispatch.drivers import Hooks, run_async, run_sync
from difficulty_router.calling.dispatch.holdback import StreamHoldback
from difficulty_router.calling.dispatch.routed_call import RECORD_KEY, Retry, RoutedCall, shadow_plan
from difficulty_router.calling.dispatch.streams import OpenedStream, stream_async, stream_sync

__all__ = [
    "CANNOT_CALL_TOOLS",
    "RECORD_KEY",
    "Attempt",
    "Binding",
    "Hooks",
    "OpenedStream",
    "Reply",
    "Retry",
    "RoutedCall",
    "StreamHoldback",
    "attempt_record",
    "check_pool",
    "escalation_rule",
    "new_query_id",
    "run_async",
    "run_sync",
    "shadow_plan",
    "stream_async",
    "stream_sync",
]
