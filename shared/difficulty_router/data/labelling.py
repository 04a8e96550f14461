"""``difficulty-router label``: collect per-model correctness labels for the user's own pool.

Every prompt goes to every pool model; each answer is graded against the row's
``reference`` (a grader from :mod:`.graders`) or, without one, by an LLM judge (1-5 score
against a rubric, correct when >= threshold). Each finished call is appended to a journal
(``OUT.calls.jsonl``) at once, so a re-run skips finished (prompt, model) pairs and an
interrupted run loses nothing; the training file (``OUT``, the format ``difficulty-router
train`` reads, plus tokens, cost and latency per model) is rebuilt from the journal at the
end, from prompts that every model answered and that were graded.

Backends: OpenAI-compatible endpoints from the pool config's ``base_url`` (and ``model``,
``api_key_env``, ``timeout``), or any LangChain chat model through the Python API. The pool
file may carry a top-level ``label`` section: ``{"judge": {pool-model fields}, "rubric": str,
"threshold": int, "generation": {model: {"system": str, "temperature": float, "max_tokens":
int}}}``. Calls run concurrently with a per-model limit; transient errors (the package's one
rule, :func:`.errors.is_transient_error`) are retried with backoff; a ``max_usd`` budget stops
new calls once spent, and what finished is kept.

This module is the run itself (:class:`Labeller`) and the choice of which prompts to label
(:func:`select_uncertain`); the models it calls are in :mod:`.label_backends`, the files it reads and
writes (settings, prompts, journal, training file, report) in :mod:`.label_files`. Their names are
importable from here too, where callers have always found them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from difficulty_router.core.errors import is_transient_error
from difficulty_router.data.graders import JudgeParseError, get_grader, judge_prompt, parse_judge_score
from difficulty_router.data.label_backends import Backend, OpenAICall, Reply, langchain_backend, openai_backend
from difficulty_router.data.label_files import (
    GENERATION_KEYS,
    LabelConfig,
    LabelReport,
    config_from_pool_file,
    journal_path,
    read_journal,
    read_prompt_rows,
    summarise,
    write_training_file,
)
from difficulty_router.data.queries import conversation_text

__all__ = [
    "GENERATION_KEYS",
    "Backend",
    "LabelConfig",
    "LabelReport",
    "Labeller",
    "OpenAICall",
    "Reply",
    "config_from_pool_file",
    "journal_path",
    "langchain_backend",
    "openai_backend",
    "read_journal",
    "read_prompt_rows",
    "select_uncertain",
    "summarise",
    "uncertainty_order",
    "write_training_file",
]


class Labeller:
    def __init__(self, backends: Sequence[Backend], config: LabelConfig) -> None:
        if len({b.name for b in backends}) != len(backends) or len(backends) < 1:
            raise ValueError("label needs at least one model, each named once")
        self.backends, self.config = list(backends), config
        self.grader = get_grader(config.grader) if config.grader is not None else None
        self._lock = threading.Lock()
        self._limits = {b.name: threading.Semaphore(config.concurrency) for b in backends}
        self.spent = 0.0
        self.stopped: str | None = None

    def run(self, rows: list[dict], output: str | os.PathLike, progress: bool = True) -> LabelReport:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        output = Path(output)
        journal, todo = self.plan(rows, output)
        bar = tqdm(total=len(todo), desc="label", unit="call", disable=not progress)
        workers = self.config.concurrency * len(self.backends)
        with open(journal, "a", encoding="utf-8") as sink, ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self._one, row, backend, sink, bar) for row, backend in todo]
            for future in futures:
                future.result()
        bar.close()
        return self.report(rows, output, len(todo), start)

    # -- the pieces both engines share (the Ray engine in scale.ray_label runs them on its driver) -------------
    def plan(self, rows: list[dict], output: Path) -> tuple[Path, list[tuple[dict, Backend]]]:
        """The journal, and the (prompt, model) pairs it does not finish yet; the money the journal records as
        spent counts against ``max_usd``."""
        journal = journal_path(output)
        done = {(r["id"], r["model"]) for r in read_journal(journal) if r["status"] in ("graded", "skipped")}
        self.spent = sum(r.get("usd", 0.0) for r in read_journal(journal))
        for row in rows:
            if "reference" not in row and self.config.judge is None:
                raise ValueError(f"prompt {row['id']!r} has no 'reference' and no judge is configured")
            if "reference" in row and self.grader is None and self.config.judge is None:
                raise ValueError("rows carry references: choose a grader (exact, choice, number, regex) or a judge")
        return journal, [(row, b) for row in rows for b in self.backends if (row["id"], b.name) not in done]

    def budget_reached(self) -> bool:
        """True (and ``stopped`` says why) once ``max_usd`` is spent: no new call may start."""
        with self._lock:
            if self.config.max_usd is not None and self.spent >= self.config.max_usd:
                self.stopped = f"budget of ${self.config.max_usd:g} reached (spent ${self.spent:.6f})"
                return True
        return False

    def report(self, rows: list[dict], output: Path, calls: int, start: float) -> LabelReport:
        """Rebuild the training file from the journal and summarise it."""
        records = read_journal(journal_path(output))
        names = [b.name for b in self.backends]
        written = write_training_file(rows, records, names, output)
        return LabelReport(
            written, calls, self.stopped, summarise(records, names), time.perf_counter() - start, str(output)
        )

    # -- one (prompt, model) pair ------------------------------------------------------------
    def _one(self, row: dict, backend: Backend, sink, bar) -> None:
        with self._limits[backend.name]:
            if self.budget_reached():
                bar.update(1)
                return
            self.write(sink, self.label_pair(row, backend), bar)

    def label_pair(self, row: dict, backend: Backend) -> dict[str, Any]:
        """Call ``backend`` on ``row`` (with retries) and grade the answer: the journal record. An exhausted or
        non-transient error, or a failed judge call, is a record with status "error" (the next run retries it)."""
        record: dict[str, Any] = {"id": row["id"], "model": backend.name}
        messages = self._messages(row["_messages"], backend.name)
        settings = self.config.generation.get(backend.name, {})
        t0 = time.perf_counter()
        try:
            reply = self._call(backend, messages, settings)
        except Exception as exc:  # noqa: BLE001 -- an exhausted or non-transient error: recorded, retried by the next run
            record.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:200]}", usd=0.0)
            return record
        record.update(
            answer=reply.text,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            latency_s=time.perf_counter() - t0,
            usd=backend.cost(reply, messages),
        )
        try:
            record.update(self._grade(row, reply.text, record))
            record["status"] = "graded"
        except JudgeParseError as exc:
            record.update(status="skipped", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 -- the judge call failed: not finished, the next run retries it
            record.update(status="error", error=f"judge: {type(exc).__name__}: {str(exc)[:200]}")
        return record

    def _messages(self, messages: list[dict], model: str) -> list[dict]:
        system = self.config.generation.get(model, {}).get("system")
        return ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in messages]

    def _call(self, backend: Backend, messages: list[dict], settings: dict) -> Reply:
        for attempt in range(self.config.retries + 1):
            try:
                return backend.call(messages, settings)
            except Exception as exc:
                if attempt == self.config.retries or not is_transient_error(exc):
                    raise
                time.sleep(self.config.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _grade(self, row: dict, answer: str, record: dict) -> dict:
        if "reference" in row and self.grader is not None:
            verdict = self.grader(answer, row["reference"])
            score = float(verdict)
            if not 0 <= score <= 1:
                raise ValueError(f"a grader returned {verdict!r}; expected a bool or a number in [0, 1]")
            return {"score": score, "graded_by": "reference"}
        judge = self.config.judge
        assert judge is not None  # checked in run()
        question = conversation_text(row["_messages"])
        messages = [
            {"role": "user", "content": judge_prompt(question, answer, row.get("reference"), self.config.rubric)}
        ]
        reply = self._call(judge, messages, {"temperature": 0.0, "max_tokens": 16})
        record["usd"] += judge.cost(reply, messages)  # the judge's call is paid whatever it says
        record["judge_reply"] = reply.text[:200]
        score = parse_judge_score(reply.text)
        return {"score": float(score >= self.config.threshold), "judge_score": score, "graded_by": "judge"}

    def write(self, sink, record: dict, bar) -> None:
        """Append one finished call to the journal (flushed at once) and count what it cost."""
        with self._lock:
            self.spent += record.get("usd", 0.0)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(1)


def select_uncertain(router, rows: list[dict], n: int, progress: bool | None = None) -> list[dict]:
    """The ``n`` prompts whose labels should help most: highest mean Bernoulli variance p(1-p) of the
    router's per-model P(success) (the probes are least sure), ties broken by disagreement between models."""
    if n < 1:
        raise ValueError(f"--select needs a positive count, got {n}")
    if n >= len(rows):
        return rows
    proba = router.predict_proba([r["_messages"] for r in rows], progress=progress)
    return [rows[i] for i in sorted(uncertainty_order(proba)[:n])]


def uncertainty_order(proba) -> Any:
    """Row indexes, most informative first: the ``label --select`` rule on a (rows, models) matrix of
    P(success) -- mean Bernoulli variance p(1-p) descending, ties by the spread across models descending.
    Separate from :func:`select_uncertain` so benchmarks that hold read-outs already rank rows by the same rule."""
    import numpy as np

    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] == 0:
        raise ValueError(f"proba must be a (rows, models) matrix, got shape {proba.shape}")
    if not np.isfinite(proba).all() or (proba < 0).any() or (proba > 1).any():
        raise ValueError("proba must hold probabilities in [0, 1]")
    uncertainty = (proba * (1 - proba)).mean(axis=1)
    disagreement = proba.std(axis=1)
    return np.lexsort((-disagreement, -uncertainty))
