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
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difficulty_router.core.errors import is_transient_error
from difficulty_router.core.pool import ModelPool, PoolModel
from difficulty_router.data.graders import (
    DEFAULT_RUBRIC,
    Grader,
    JudgeParseError,
    get_grader,
    judge_prompt,
    parse_judge_score,
)
from difficulty_router.data.queries import conversation_text, to_conversation

GENERATION_KEYS = {"system", "temperature", "max_tokens"}


@dataclass
class Reply:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass
class Backend:
    """One callable model: ``call(messages, settings) -> Reply``, with its prices."""

    name: str
    call: Callable[[list[dict], dict], Reply]
    spec: PoolModel | None = None

    def cost(self, reply: Reply, messages: list[dict]) -> float:
        spec = self.spec
        if spec is None:
            return 0.0
        if spec.cost_per_query is not None:
            return float(spec.cost_per_query)
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else len(conversation_text(messages)) / 4
        completion = reply.completion_tokens if reply.completion_tokens is not None else len(reply.text) / 4
        return (prompt * (spec.input_cost_per_1m or 0.0) + completion * (spec.output_cost_per_1m or 0.0)) / 1e6


def openai_backend(spec: PoolModel) -> Backend:
    """A pool model served at ``spec.base_url`` through the OpenAI client (no client-side retries: ours).

    The backend pickles (its call keeps the spec and builds its client on first use), so the Ray engine
    sends it to workers; a worker reads the API key from its own environment."""
    if not spec.base_url:
        raise ValueError(f"pool model {spec.name!r} has no base_url; label needs an endpoint (or a LangChain model)")
    if spec.api_key_env and not os.environ.get(spec.api_key_env):
        raise ValueError(f"pool model {spec.name!r}: the environment variable {spec.api_key_env} is not set here")
    return Backend(spec.name, OpenAICall(spec), spec)


class OpenAICall:
    """``call(messages, settings) -> Reply`` against an OpenAI-compatible endpoint; the client is built lazily
    and left out of the pickled state (it holds sockets and locks)."""

    def __init__(self, spec: PoolModel) -> None:
        self.spec = spec
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"])  # type: ignore[misc]

    def _ensure_client(self):
        with self._lock:
            if self._client is None:
                import openai

                spec = self.spec
                key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else "none"
                if spec.api_key_env and not key:
                    raise ValueError(
                        f"pool model {spec.name!r}: the environment variable {spec.api_key_env} is not set here"
                    )
                self._client = openai.OpenAI(
                    base_url=spec.base_url, api_key=key or "none", timeout=spec.timeout or 60.0, max_retries=0
                )
            return self._client

    def __call__(self, messages: list[dict], settings: dict) -> Reply:
        client = self._ensure_client()
        extra = {k: settings[k] for k in ("temperature", "max_tokens") if k in settings}
        response = client.chat.completions.create(model=self.spec.served_model, messages=messages, **extra)
        usage = response.usage
        return Reply(
            text=response.choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )


def langchain_backend(name: str, chat_model: Any, spec: PoolModel | None = None) -> Backend:
    """A LangChain chat model (``invoke`` on role/content dicts); tokens from its ``usage_metadata``."""

    def call(messages: list[dict], settings: dict) -> Reply:
        message = chat_model.invoke(messages)
        usage = getattr(message, "usage_metadata", None) or {}
        content = message.content if isinstance(message.content, str) else json.dumps(message.content)
        return Reply(content, usage.get("input_tokens"), usage.get("output_tokens"))

    return Backend(name, call, spec)


@dataclass
class LabelConfig:
    grader: str | Grader | None = None
    judge: Backend | None = None
    rubric: str = DEFAULT_RUBRIC
    threshold: int = 4
    generation: dict[str, dict] = field(default_factory=dict)
    concurrency: int = 4
    retries: int = 3
    backoff_s: float = 0.5
    max_usd: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= 5:
            raise ValueError(f"the judge threshold must be 1-5, got {self.threshold}")
        if self.concurrency < 1 or self.retries < 0:
            raise ValueError("concurrency must be >= 1 and retries >= 0")
        if self.max_usd is not None and not self.max_usd >= 0:
            raise ValueError(f"max_usd must be a non-negative number, got {self.max_usd}")
        for model, settings in self.generation.items():
            unknown = set(settings) - GENERATION_KEYS
            if unknown:
                raise ValueError(f"generation settings for {model!r}: unknown keys {sorted(unknown)}")


def config_from_pool_file(path: str | os.PathLike, **overrides) -> tuple[ModelPool, LabelConfig]:
    """The pool and the ``label`` section of a pool file (judge backend, rubric, threshold, generation)."""
    pool = ModelPool.load(path)
    data = json.loads(Path(path).read_text()) if Path(path).suffix == ".json" else _yaml(path)
    section = data.get("label") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: 'label' must be an object")
    judge = None
    if section.get("judge") is not None:
        try:
            judge = openai_backend(PoolModel(**section["judge"]))
        except TypeError as exc:
            raise ValueError(f"{path}: label.judge: {exc}") from None
    kwargs = {k: section[k] for k in ("rubric", "threshold", "generation") if k in section}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return pool, LabelConfig(judge=judge, **kwargs)


def _yaml(path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def read_prompt_rows(path: str | os.PathLike) -> list[dict]:
    """JSON Lines: a string, or an object with ``prompt``/``messages`` (+ optional ``id``, ``reference``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    rows, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
            row = {"prompt": row} if isinstance(row, str) else row
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise ValueError(f"{path}, line {lineno}: expected a string or an object with 'prompt' or 'messages'")
            row = dict(row)
            row["id"] = str(row.get("id", lineno))
            if row["id"] in seen:
                raise ValueError(f"{path}, line {lineno}: the id {row['id']!r} repeats")
            seen.add(row["id"])
            try:
                row["_messages"] = to_conversation(row.get("prompt", row.get("messages")))
            except ValueError as exc:
                raise ValueError(f"{path}, line {lineno}: {exc}") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


@dataclass
class LabelReport:
    rows_written: int
    calls: int
    stopped: str | None
    per_model: dict[str, dict]
    seconds: float
    output: str

    def table(self) -> str:
        head = "| model | graded | correct | skipped | errors | tokens in/out | USD | mean latency |"
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for name, s in self.per_model.items():
            acc = f"{s['correct'] / s['graded']:.1%}" if s["graded"] else "-"
            lat = f"{s['latency_s'] / max(s['answered'], 1):.2f} s"
            lines.append(
                f"| {name} | {s['graded']} | {acc} | {s['skipped']} | {s['errors']} | "
                f"{s['prompt_tokens']}/{s['completion_tokens']} | {s['usd']:.6f} | {lat} |"
            )
        return "\n".join(lines)


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


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".calls.jsonl")


def read_journal(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write: that call is simply redone
    # the latest record of a pair wins (a retried error is replaced by its success)
    latest = {(r["id"], r["model"]): r for r in out}
    return list(latest.values())


def write_training_file(rows: list[dict], records: list[dict], models: list[str], output: Path) -> int:
    """Prompts graded for every model, in ``difficulty-router train`` format (plus tokens, latency, answers)."""
    by_pair = {(r["id"], r["model"]): r for r in records if r["status"] == "graded"}
    written = 0
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            pairs = [by_pair.get((row["id"], m)) for m in models]
            if any(p is None for p in pairs):
                continue
            graded = [p for p in pairs if p is not None]
            out: dict[str, Any] = {"id": row["id"]}
            out["prompt" if "prompt" in row else "messages"] = row.get("prompt", row.get("messages"))
            hard = all(p["score"] in (0.0, 1.0) for p in graded)
            out["correct" if hard else "scores"] = {
                m: (bool(p["score"]) if hard else p["score"]) for m, p in zip(models, graded, strict=True)
            }
            out["cost"] = {m: p["usd"] for m, p in zip(models, graded, strict=True)}
            out["tokens"] = {
                m: [p["prompt_tokens"], p["completion_tokens"]] for m, p in zip(models, graded, strict=True)
            }
            out["latency_s"] = {m: round(p["latency_s"], 4) for m, p in zip(models, graded, strict=True)}
            if "reference" in row:
                out["reference"] = row["reference"]
            fh.write(json.dumps(out, ensure_ascii=False) + "\n")
            written += 1
    os.replace(tmp, output)
    return written


def summarise(records: list[dict], models: list[str]) -> dict[str, dict]:
    out = {}
    for m in models:
        mine = [r for r in records if r["model"] == m]
        answered = [r for r in mine if "answer" in r]
        graded = [r for r in mine if r["status"] == "graded"]
        out[m] = {
            "graded": len(graded),
            "correct": sum(r["score"] >= 0.5 for r in graded),
            "skipped": sum(r["status"] == "skipped" for r in mine),
            "errors": sum(r["status"] == "error" for r in mine),
            "answered": len(answered),
            "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in answered),
            "completion_tokens": sum(r.get("completion_tokens") or 0 for r in answered),
            "usd": sum(r.get("usd", 0.0) for r in mine),
            "latency_s": sum(r.get("latency_s", 0.0) for r in answered),
        }
    return out


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
