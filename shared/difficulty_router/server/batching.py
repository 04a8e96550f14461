"""Micro-batching: concurrent requests share one extraction forward pass.

One forward pass over 16 prompts costs far less than 16 passes over one, so the server
collects the requests that arrive within a short window (``max_wait`` seconds, or until
``max_batch`` are waiting) and decides them together. The batch function is synchronous
and CPU-bound (torch), so it runs on a dedicated worker thread: the event loop only
queues, awaits and wakes futures, and never blocks. A single worker also means one
forward pass at a time, which is what a CPU (or a single GPU) serves best; requests that
arrive during a pass are batched into the next one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


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
    """

    def __init__(self, fn: Callable[[list, Hashable], Sequence], *, max_batch: int = 32, max_wait: float = 0.005,
                 on_batch: Callable[[int, float], None] | None = None, name: str = "router") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")

    async def submit(self, value: Any, key: Hashable = None) -> Any:
        """Queue one value and wait for its result."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(value, key, future))
        return await future

    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._collect() if not item.future.done()]  # drop cancelled callers
            groups: dict[Hashable, list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for key, items in groups.items():
                start = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self.fn, [i.value for i in items], key)
                    if len(results) != len(items):
                        raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
                except Exception as exc:  # every caller of the batch sees the failure
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                if self.on_batch is not None:
                    self.on_batch(len(items), time.perf_counter() - start)
                for item, result in zip(items, results):
                    if not item.future.done():
                        item.future.set_result(result)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
            self._worker = None
        self._executor.shutdown(wait=False, cancel_futures=True)
