"""Micro-batching: concurrent requests share one extraction forward pass.

One forward pass over 16 prompts costs far less than 16 passes over one, so the server
collects the requests that arrive within a short window (``max_wait`` seconds, or until
``max_batch`` are waiting) and decides them together. The batch function is synchronous
and CPU-bound (torch), so it runs on a dedicated worker thread: the event loop only
queues, awaits and wakes futures, and never blocks. A single worker also means one
forward pass at a time, which is what a CPU (or a single GPU) serves best; requests that
arrive during a pass are batched into the next one.

Under overload the queue is what grows, so it is bounded: ``max_queue`` waiting items, past
which ``submit`` raises :class:`QueueFull` at once (the server answers 429 and the client
backs off), and ``timeout`` seconds per item, after which the caller gets
:class:`DeadlineExceeded` (503) and its item is dropped unrun. Nothing a batch function or
a callback raises can stop the worker: the failure goes to that batch's callers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batcher already holds ``max_queue`` waiting items."""


class DeadlineExceeded(Exception):
    """The item was not decided within the batcher's ``timeout``."""


@dataclass
class _Item:
    value: Any
    key: Hashable
    future: asyncio.Future


class MicroBatcher:
    """Collects ``submit``-ted items and calls ``fn(values, key)`` once per batch and key.

    ``fn`` receives the values of the items sharing one ``key`` (for the router: the same
    ``exclude`` set) and returns one result per value, in order. Its exceptions reach
    every caller of that batch. ``on_batch(size, seconds)`` is told about each call.
    ``max_queue`` bounds the items waiting for the worker, ``timeout`` (seconds, None for
    none) the wait for a result.
    """

    def __init__(
        self,
        fn: Callable[[list, Hashable], Sequence],
        *,
        max_batch: int = 32,
        max_wait: float = 0.005,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "router",
        max_queue: int = 1024,
        timeout: float | None = 30.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.max_queue = int(max_queue)
        self.timeout = timeout
        self.on_batch = on_batch
        self.name = name
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")

    @property
    def depth(self) -> int:
        """Items waiting for the worker (not counting the batch it is deciding)."""
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, value: Any, key: Hashable = None) -> Any:
        """Queue one value and wait for its result; raises QueueFull or DeadlineExceeded under overload."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue(self.max_queue)
            self._worker = asyncio.get_running_loop().create_task(self._run())
        queue = self._queue
        assert queue is not None  # created above together with the worker
        future = asyncio.get_running_loop().create_future()
        try:
            queue.put_nowait(_Item(value, key, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:  # wait_for cancelled the future, so the worker skips the item
            raise DeadlineExceeded(f"not decided within {self.timeout:g} s") from None

    async def _collect(self) -> list[_Item]:
        queue = self._queue
        assert queue is not None  # the worker runs only after submit created its queue
        batch = [await queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = [item for item in await self._collect() if not item.future.done()]  # drop cancelled callers
            groups: dict[Hashable, list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for key, items in groups.items():
                await self._decide(key, [i for i in items if not i.future.done()])

    async def _decide(self, key: Hashable, items: list[_Item]) -> None:
        """One call of ``fn``; whatever goes wrong fails these items' futures and nothing else. A batch that
        fails is decided again one item at a time, so one query ``fn`` cannot read costs only its own
        caller an answer, not every request that happened to share its batch."""
        if not items:
            return
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.fn, [i.value for i in items], key
            )
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 (every caller of the batch sees the failure)
            if len(items) > 1:
                for item in items:
                    if not item.future.done():
                        await self._decide(key, [item])
                return
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self.on_batch is not None:
            try:
                self.on_batch(len(items), time.perf_counter() - start)
            except Exception:  # a broken observer must not cost the callers their answers
                logger.exception("the on_batch callback of batcher %r failed", self.name)
        for item, result in zip(items, results, strict=False):
            if not item.future.done():
                item.future.set_result(result)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=False, cancel_futures=True)
