"""Streams through a routed call, in its two modes: commit once the call's hold-back is read
(routing), or read each rung whole and judge it before anything reaches the caller (a cascade).

Both are the drivers' loop with an ``invoke`` that opens a stream: :func:`stream_sync` and
:func:`stream_async` return an :class:`OpenedStream` whose unread tail, in commit mode, ends the
served attempt's hooks when it ends. Commit mode reads the chunks the call's
:class:`~.holdback.StreamHoldback` holds back (just the first by default) inside ``invoke``, so a
stream that breaks before it commits is a failed attempt like any other and escalates; one that
breaks after is the caller's error. A stream given up on is closed (``close`` / ``aclose``), so
its connection does not linger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from difficulty_router.calling.attempt import Reply
from difficulty_router.calling.dispatch.drivers import Hooks, run_async, run_sync
from difficulty_router.calling.dispatch.holdback import StreamHoldback
from difficulty_router.calling.dispatch.routed_call import RoutedCall


@dataclass
class OpenedStream:
    """An accepted model's stream: ``head`` (chunks already read) then ``tail`` (the rest, unread)."""

    head: list[Any]
    tail: Any = field(default_factory=lambda: iter(()))


class _Hold:
    """The chunks read before commit, and whether the call's hold-back commits the stream now."""

    def __init__(self, holdback: StreamHoldback) -> None:
        self.holdback = holdback
        self.head: list[Any] = []
        self._first_at: float | None = None

    def add(self, chunk: Any) -> bool:
        """Hold ``chunk``; True once the stream commits."""
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
        self.head.append(chunk)
        return self.holdback.commits(len(self.head), now - self._first_at)


def stream_sync(
    call: RoutedCall,
    open_stream: Callable[[str], Iterable[Any]],
    signals: Callable[[list[Any]], Reply],
    hooks: Hooks | None = None,
) -> OpenedStream:
    """Open streams up the ladder until one is accepted.

    Commit mode (routing): a model is accepted once its held-back chunks are read (its first chunk
    unless the call has a :class:`~.holdback.StreamHoldback`); errors before that escalate, errors
    after it are the caller's (text already shown cannot be taken back). Buffer mode (cascade):
    each rung's whole stream is read and judged (``signals`` turns the chunks into a
    :class:`Reply`); a rejected rung's chunks never reach the caller.
    """

    def invoke(model: str) -> Reply:
        chunks = iter(open_stream(model))
        if call.buffered:
            head = list(chunks)
            reply = signals(head)
            reply.value = OpenedStream(head)
            return reply
        hold = _Hold(call.holdback)
        try:
            for chunk in chunks:
                if hold.add(chunk):
                    break
        except BaseException:
            _close(chunks)
            raise
        return Reply(value=OpenedStream(hold.head, chunks), deferred=True)

    hooks = hooks or Hooks()
    opened = run_sync(call, invoke, hooks).value
    if not call.buffered:
        opened.tail = _watched(opened.tail, call, hooks)
    return opened


def _watched(tail: Iterator[Any], call: RoutedCall, hooks: Hooks) -> Iterator[Any]:
    """The rest of a committed stream; the attempt's hooks end (or fail) when the stream does."""
    assert call.served is not None and call.reply is not None
    try:
        yield from tail
    except Exception as exc:
        hooks.error(call, call.open_handle, None, exc)
        raise
    finally:
        _close(tail)
    hooks.end(call, call.open_handle, call.served, call.reply)


async def stream_async(
    call: RoutedCall,
    open_stream: Callable[[str], Any],
    signals: Callable[[list[Any]], Reply],
    hooks: Hooks | None = None,
) -> OpenedStream:
    """The async twin of :func:`stream_sync`; ``open_stream(model)`` awaits to an async iterator
    (or is one)."""

    async def invoke(model: str) -> Reply:
        opened = open_stream(model)
        if asyncio.iscoroutine(opened) or isinstance(opened, asyncio.Future):
            opened = await opened
        chunks = opened.__aiter__()
        if call.buffered:
            head = [chunk async for chunk in chunks]
            reply = signals(head)
            reply.value = OpenedStream(head, _empty_async())
            return reply
        hold = _Hold(call.holdback)
        try:
            async for chunk in chunks:
                if hold.add(chunk):
                    break
        except BaseException:
            await _aclose(chunks)
            raise
        return Reply(value=OpenedStream(hold.head, chunks), deferred=True)

    hooks = hooks or Hooks()
    opened = (await run_async(call, invoke, hooks)).value
    if not call.buffered:
        opened.tail = _awatched(opened.tail, call, hooks)
    return opened


async def _awatched(tail: AsyncIterator[Any], call: RoutedCall, hooks: Hooks) -> AsyncIterator[Any]:
    assert call.served is not None and call.reply is not None
    try:
        async for chunk in tail:
            yield chunk
    except Exception as exc:
        await hooks.aerror(call, call.open_handle, None, exc)
        raise
    finally:
        await _aclose(tail)
    await hooks.aend(call, call.open_handle, call.served, call.reply)


def _close(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if callable(close):
        close()


async def _aclose(chunks: Any) -> None:
    aclose = getattr(chunks, "aclose", None)
    if callable(aclose):
        await aclose()


async def _empty_async() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover
