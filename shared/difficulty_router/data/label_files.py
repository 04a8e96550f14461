"""What ``difficulty-router label`` reads and writes: its settings, the prompt file, the journal, the
training file and the report.

- settings: :class:`LabelConfig`, built from a pool file's ``label`` section by :func:`config_from_pool_file`;
- the prompt file (:func:`read_prompt_rows`): JSON Lines of strings or objects with ``prompt``/``messages``;
- the journal (``OUT.calls.jsonl``, :func:`journal_path`, :func:`read_journal`): one record per finished call,
  appended as calls finish, so a re-run skips what is done;
- the training file (:func:`write_training_file`): the outcomes format ``difficulty-router train`` reads,
  rebuilt from the journal;
- the report (:class:`LabelReport`, :func:`summarise`): counts, tokens, money and latency per model.

The run that calls the models and keeps these files is :class:`~difficulty_router.data.labelling.Labeller`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difficulty_router.core.pool import ModelPool, PoolModel
from difficulty_router.data.graders import DEFAULT_RUBRIC, Grader
from difficulty_router.data.jsonl import read_jsonl, write_jsonl
from difficulty_router.data.label_backends import Backend, openai_backend
from difficulty_router.data.queries import to_conversation

GENERATION_KEYS = {"system", "temperature", "max_tokens"}


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
    for lineno, row in read_jsonl(path, objects_only=False):
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


def journal_path(output: Path) -> Path:
    """Where the run for training file ``output`` journals its calls: ``OUTPUT.calls.jsonl``."""
    return output.with_name(output.name + ".calls.jsonl")


def read_journal(path: Path) -> list[dict]:
    """The journal's records, the latest of each (prompt, model) pair (a retried error is replaced by its
    success); none when the journal does not exist yet."""
    if not path.is_file():
        return []
    # a line cut by a crash mid-write is passed over: that call is simply redone
    records = [record for _, record in read_jsonl(path, skip_malformed=True)]
    latest = {(r["id"], r["model"]): r for r in records}
    return list(latest.values())


def write_training_file(rows: list[dict], records: list[dict], models: list[str], output: Path) -> int:
    """Prompts graded for every model, in ``difficulty-router train`` format (plus tokens, latency, answers);
    returns how many were written."""
    by_pair = {(r["id"], r["model"]): r for r in records if r["status"] == "graded"}
    graded_rows = ((row, [by_pair.get((row["id"], m)) for m in models]) for row in rows)
    return write_jsonl(output, (_training_row(row, pairs, models) for row, pairs in graded_rows if None not in pairs))


def _training_row(row: dict, graded: list, models: list[str]) -> dict[str, Any]:
    """One prompt's line of the training file, from its graded journal record for each model."""
    out: dict[str, Any] = {"id": row["id"]}
    out["prompt" if "prompt" in row else "messages"] = row.get("prompt", row.get("messages"))
    hard = all(p["score"] in (0.0, 1.0) for p in graded)
    out["correct" if hard else "scores"] = {
        m: (bool(p["score"]) if hard else p["score"]) for m, p in zip(models, graded, strict=True)
    }
    out["cost"] = {m: p["usd"] for m, p in zip(models, graded, strict=True)}
    out["tokens"] = {m: [p["prompt_tokens"], p["completion_tokens"]] for m, p in zip(models, graded, strict=True)}
    out["latency_s"] = {m: round(p["latency_s"], 4) for m, p in zip(models, graded, strict=True)}
    if "reference" in row:
        out["reference"] = row["reference"]
    return out


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
