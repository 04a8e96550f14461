"""The drivers: one loop each, sync and async, that walk a :class:`~.routed_call.RoutedCall` by
calling the model it names, and the tracing hooks (:class:`Hooks`) a front end plugs into them.

The loop is the same in both: wait out a retry's backoff, call the model, report the answer
(the call's verdict accepts it or moves on) or the error (the call's rule escalates it or not),
and, in shadow mode, ask the sampled alternative once the call is served. The two loops are
twins line for line (one awaits the model and the hooks): what the call decides lives in
:class:`~.routed_call.RoutedCall`, so all they repeat is the order of the steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from difficulty_router.calling.attempt import Attempt, Reply
from difficulty_router.calling.dispatch.routed_call import RoutedCall


class Hooks:
    """Tracing callbacks of a front end (LangChain child runs, LlamaIndex events, server metrics).

    ``start`` returns a handle passed back to ``end`` / ``error``; ``error`` gets the attempt the
    call recorded, or None when the error is the caller's (it propagates, no escalation). The
    async driver awaits the ``a*`` forms, which default to the sync ones.
    """

    def start(self, call: RoutedCall, model: str) -> Any:
        return None

    def end(self, call: RoutedCall, handle: Any, attempt: Attempt, reply: Reply) -> None:
        return None

    def error(self, call: RoutedCall, handle: Any, attempt: Attempt | None, exc: BaseException) -> None:
        return None

    async def astart(self, call: RoutedCall, model: str) -> Any:
        return self.start(call, model)

    async def aend(self, call: RoutedCall, handle: Any, attempt: Attempt, reply: Reply) -> None:
        self.end(call, handle, attempt, reply)

    async def aerror(self, call: RoutedCall, handle: Any, attempt: Attempt | None, exc: BaseException) -> None:
        self.error(call, handle, attempt, exc)


def run_sync(call: RoutedCall, invoke: Callable[[str], Reply], hooks: Hooks | None = None) -> Reply:
    """Call ``invoke(model)`` up the ladder until an answer is accepted; returns that reply."""
    hooks = hooks or Hooks()
    while not call.done:
        model = call.next_model
        assert model is not None
        if call.delay:
            time.sleep(call.delay)
        handle = hooks.start(call, model)
        began = time.perf_counter()
        try:
            pik = call.pik_for(model)
            reply = invoke(model)
            attempt = call.accept(model, reply, time.perf_counter() - began, pik=_first(reply.pik, pik))
        except Exception as exc:
            recorded = call.fail(model, exc, time.perf_counter() - began)
            hooks.error(call, handle, recorded, exc)
            if recorded is None or call.exhausted:
                call.finish()
                raise
            continue
        if reply.deferred:
            call.open_handle = handle
        else:
            hooks.end(call, handle, attempt, reply)
    alternative = _alternative_to_ask(call)
    if alternative is not None:
        try:
            call.alternative_reply = invoke(alternative)
        except Exception as exc:  # noqa: BLE001 - a label we failed to collect never fails the served call
            call.alternative_failed(exc)
    call.finish()
    assert call.reply is not None
    return call.reply


async def run_async(call: RoutedCall, invoke: Callable[[str], Awaitable[Reply]], hooks: Hooks | None = None) -> Reply:
    """The async twin of :func:`run_sync`; P(IK) scorers (a forward pass) run off the event loop."""
    hooks = hooks or Hooks()
    while not call.done:
        model = call.next_model
        assert model is not None
        if call.delay:
            await asyncio.sleep(call.delay)
        handle = await hooks.astart(call, model)
        began = time.perf_counter()
        try:
            pik = await asyncio.to_thread(call.pik_for, model) if call.scores_pik else None
            reply = await invoke(model)
            attempt = call.accept(model, reply, time.perf_counter() - began, pik=_first(reply.pik, pik))
        except Exception as exc:
            recorded = call.fail(model, exc, time.perf_counter() - began)
            await hooks.aerror(call, handle, recorded, exc)
            if recorded is None or call.exhausted:
                call.finish()
                raise
            continue
        if reply.deferred:
            call.open_handle = handle
        else:
            await hooks.aend(call, handle, attempt, reply)
    alternative = _alternative_to_ask(call)
    if alternative is not None:
        try:
            call.alternative_reply = await invoke(alternative)
        except Exception as exc:  # noqa: BLE001 - a label we failed to collect never fails the served call
            call.alternative_failed(exc)
    call.finish()
    assert call.reply is not None
    return call.reply


def _alternative_to_ask(call: RoutedCall) -> str | None:
    """The shadow-mode alternative the driver asks now: not for a committed stream, nor when the
    front end asks it itself after responding (the server)."""
    assert call.reply is not None
    if not call.sample_inline or call.reply.deferred:
        return None
    return call.sample_alternative


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)
