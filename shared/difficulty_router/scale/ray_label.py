"""Distributed labelling: the (prompt, model) calls of ``difficulty-router label`` spread over Ray workers.

The driver plans, journals and reports with :class:`~difficulty_router.data.labelling.Labeller` itself (the same
journal, training file and summary table as the single-process command, so a run of either engine resumes
the other's); only :meth:`Labeller.label_pair` (the call, its retries and the grade) runs on the workers.

- **One writer.** Workers return their record; the driver appends it to the journal, flushed at once. A pair
  gets one journal line per finished call, whatever happens to the workers.
- **A lost worker.** Ray restarts the actor and runs its unfinished calls again (``max_task_retries``); the
  call that was in flight on the dead process is made twice (paid twice, recorded once). If the restarts run
  out, the pair is journalled as an error, which the next run retries, as for a failed call.
- **Concurrency per model, cluster-wide.** The driver is the only one that starts calls and keeps at most
  ``concurrency`` in flight per model, however many workers or nodes there are.
- **Budget.** Before each call starts the driver compares the journal's spend with ``max_usd`` and stops
  starting new ones once it is reached. Calls already in flight finish and are kept, so the spend can pass
  the budget by at most ``concurrency`` x models calls (each with its judge call), as with one process.
- **No free CPUs.** The driver waits at most ``worker_start_timeout_s`` for the workers to be placed and
  started before it sends them anything; when the cluster cannot place them all in that time it kills them
  and raises :class:`~difficulty_router.scale.WorkersNotPlacedError` (what was asked, what the cluster has,
  what to do) instead of waiting for CPUs that may never come free. Nothing is journalled, so a later run
  starts the same calls.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difficulty_router.data.labelling import Backend, LabelConfig, Labeller, LabelReport
from difficulty_router.scale.cluster import DEFAULT_WORKER_START_TIMEOUT_S, check_timeout, ensure_ray, start_workers


class LabelWorker:
    """Holds the backends (each builds its client once per worker) and answers one pair per call."""

    def __init__(self, backends: list[Backend], config: LabelConfig):
        self.labeller = Labeller(backends, config)
        self.by_name = {b.name: b for b in backends}

    def label(self, row: dict, model: str) -> dict[str, Any]:
        return self.labeller.label_pair(row, self.by_name[model])


class RayLabeller:
    """``Labeller`` with the calls made by ``workers`` Ray actors (default: one per CPU of the cluster at
    ``cpus_per_worker``). ``address``: an existing cluster (``"auto"`` for one started with ``ray start``);
    without it a local one is started. Backends travel to the workers by pickling: those of
    :func:`~difficulty_router.data.labelling.openai_backend` do (a worker reads an API key from its own environment;
    the driver's values of the pool's ``api_key_env`` variables are passed to the workers it starts).
    ``worker_start_timeout_s``: how long to wait for every worker to be placed and started before the calls
    begin (:class:`~difficulty_router.scale.WorkersNotPlacedError` after that)."""

    def __init__(
        self,
        backends: Sequence[Backend],
        config: LabelConfig,
        *,
        workers: int | None = None,
        cpus_per_worker: float = 1.0,
        address: str | None = None,
        worker_restarts: int = 3,
        worker_start_timeout_s: float = DEFAULT_WORKER_START_TIMEOUT_S,
    ) -> None:
        self.driver = Labeller(backends, config)  # validates backends and config before any cluster starts
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        if not cpus_per_worker > 0 or worker_restarts < 0:
            raise ValueError("cpus_per_worker must be positive and worker_restarts >= 0")
        self.backends, self.config = list(backends), config
        self.workers, self.cpus_per_worker, self.address = workers, cpus_per_worker, address
        self.worker_restarts = worker_restarts
        self.worker_start_timeout_s = check_timeout(worker_start_timeout_s)

    @property
    def stopped(self) -> str | None:
        return self.driver.stopped

    def run(self, rows: list[dict], output: str | os.PathLike, progress: bool = True) -> LabelReport:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        output = Path(output)
        journal, todo = self.driver.plan(rows, output)
        bar = tqdm(total=len(todo), desc="label (ray)", unit="call", disable=not progress)
        if todo:
            self._check_pickles()
            ray = ensure_ray(self.address)
            actors = self._start_workers(ray, len(todo))
            try:
                with open(journal, "a", encoding="utf-8") as sink:
                    self._dispatch(ray, actors, todo, sink, bar)
            finally:
                for actor in actors:
                    ray.kill(actor)
        bar.close()
        return self.driver.report(rows, output, len(todo), start)

    def _check_pickles(self) -> None:
        """The backends and config go to the workers by value (a few kB, so a restarted worker gets them again);
        what does not pickle is refused here, before a cluster starts."""
        from ray import cloudpickle

        try:
            cloudpickle.dumps((self.backends, self.config))
        except Exception as exc:  # noqa: BLE001 -- cloudpickle raises many kinds; say which input it was
            raise TypeError(
                f"the Ray engine sends the backends and the label config to its workers, and they do not pickle "
                f"({type(exc).__name__}: {exc}); use endpoint backends (openai_backend, the pool file's base_url) "
                "and a grader that pickles"
            ) from None

    def _start_workers(self, ray, calls: int) -> list:
        n = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_worker))
        n = min(n, calls)
        # every worker can hold its share of the calls the per-model limits allow in flight at once
        threads = math.ceil(self.config.concurrency * len(self.backends) / n)
        keys = {m.spec.api_key_env for m in [*self.backends, self.config.judge] if m and m.spec and m.spec.api_key_env}
        env = {k: os.environ[k] for k in keys if k in os.environ}
        actor_class = ray.remote(LabelWorker).options(
            num_cpus=self.cpus_per_worker,
            max_concurrency=threads,
            max_restarts=self.worker_restarts,
            max_task_retries=self.worker_restarts,
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )
        # placed and running, or killed with an error that says why: never a wait on CPUs that are not there
        return start_workers(
            ray,
            lambda: actor_class.remote(self.backends, self.config),
            n,
            "labelling",
            self.cpus_per_worker,
            self.worker_start_timeout_s,
        )

    def _dispatch(self, ray, actors: list, todo: list[tuple[dict, Backend]], sink, bar) -> None:
        """Keep up to ``concurrency`` calls per model in flight on the least busy workers; journal each result
        as it comes back; stop starting calls once the budget is spent."""
        queues: dict[str, deque[dict]] = {b.name: deque() for b in self.backends}
        for row, backend in todo:
            queues[backend.name].append(row)
        in_flight: dict[Any, tuple[dict, str, int]] = {}
        per_model = dict.fromkeys(queues, 0)
        busy = [0] * len(actors)
        while True:
            started = True
            while started:  # one call per model per pass: the models' calls interleave as in one process
                started = False
                for name, queue in queues.items():
                    if not queue or per_model[name] >= self.config.concurrency:
                        continue
                    if self.driver.budget_reached():
                        bar.update(sum(len(q) for q in queues.values()))  # counted as not started, like one process
                        for q in queues.values():
                            q.clear()
                        break
                    row = queue.popleft()
                    worker = busy.index(min(busy))
                    in_flight[actors[worker].label.remote(row, name)] = (row, name, worker)
                    per_model[name] += 1
                    busy[worker] += 1
                    started = True
            if not in_flight:
                return
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                row, name, worker = in_flight.pop(ref)
                per_model[name] -= 1
                busy[worker] -= 1
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker's restarts ran out: the next run retries it
                    record = {
                        "id": row["id"],
                        "model": name,
                        "status": "error",
                        "error": f"worker lost: {type(exc).__name__}: {str(exc)[:200]}",
                        "usd": 0.0,
                    }
                self.driver.write(sink, record, bar)


def label_distributed(
    rows: list[dict],
    backends: Sequence[Backend],
    config: LabelConfig,
    output: str | os.PathLike,
    *,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    progress: bool = True,
    worker_start_timeout_s: float = DEFAULT_WORKER_START_TIMEOUT_S,
) -> LabelReport:
    """Label ``rows`` (from :func:`~difficulty_router.data.labelling.read_prompt_rows`) with every backend on a Ray
    cluster into ``output`` and its journal: the single-process ``Labeller.run`` result, resumable by either."""
    labeller = RayLabeller(
        backends,
        config,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        address=address,
        worker_start_timeout_s=worker_start_timeout_s,
    )
    return labeller.run(rows, output, progress=progress)


__all__ = ["LabelWorker", "RayLabeller", "label_distributed"]
