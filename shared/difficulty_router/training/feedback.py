"""Join user grades (thumbs, correct/incorrect, 1-5 scores) to a decision log: training rows from traffic.

A grades file is JSON Lines, one grade a line. Each names the call it grades by ``query_id``
(from the call's record, or the server's ``x-router-query-id`` header) or by ``prompt_sha256``
(or by the prompt itself: ``prompt``/``messages``, hashed as the log hashes it), and gives one
verdict: ``thumbs`` ("up"/"down", or true/false), ``correct`` (true/false) or ``score`` (a
number, correct when >= the threshold; 1-5 with threshold 4 by default). ``model`` (optional)
says which model's answer is graded; by default the model that served the call (in shadow
mode a grade of the sampled alternative's answer names it).

Where the prompt text comes from: the log stores only its SHA-256, never the text, and training
needs the text (the read-out is computed from the tokens; the lexical and stacked predictors read
the words). So each grade's prompt comes from the grade's own ``prompt``/``messages`` or from a
prompts file (``prompts=``, any JSON Lines of strings or objects with ``prompt``/``messages``,
e.g. the application's own request log), matched by hash; a given text must hash to the logged
hash (else an error: it is not the prompt that was routed). A grade whose prompt cannot be found
is an error naming it. The feature cache needs no text to be found again, but the text is
needed to rebuild the token ids it is keyed by; ``features_key.row_key`` in the log is that key.

Output rows are in the outcomes format ``difficulty-router train`` reads, one per distinct
prompt, with ``correct`` (or ``scores``, the share of grades that were correct, when calls of
the same prompt to the same model were graded differently) for the graded models only: a row
usually labels one model, the one that served. ``train --update`` fills the other models
(:mod:`.update`). Nothing is dropped silently: unknown ids are an error (or, with
``allow_unmatched``, counted and listed), two different verdicts for one call are an error
naming both lines, and the report counts everything.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difficulty_router.data.jsonl import read_jsonl, write_jsonl
from difficulty_router.data.queries import to_conversation
from difficulty_router.routing.decision_log import prompt_sha256, read_log

VERDICTS = ("thumbs", "correct", "score")
THUMBS = {"up": True, "down": False, "+1": True, "-1": False, True: True, False: False}


@dataclass(frozen=True)
class Grade:
    """One line of a grades file, checked."""

    where: str  # "FILE, line N"
    correct: bool
    query_id: str | None = None
    prompt_sha256: str | None = None
    query: Any = None  # the prompt text or conversation, when the grade carries it
    model: str | None = None


@dataclass
class FeedbackReport:
    grades: int = 0
    matched: int = 0
    unmatched: list[str] = field(default_factory=list)  # "FILE, line N: why"
    duplicates: int = 0  # the same verdict given twice for one call (kept once)
    decisions: int = 0  # logged calls read
    ungraded_decisions: int = 0
    rows: int = 0
    labels: int = 0  # (prompt, model) labels written
    mixed_labels: int = 0  # labels averaged over calls of one prompt graded differently
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.__dict__, "unmatched_count": len(self.unmatched)}

    def summary(self) -> str:
        lines = [
            f"{self.grades} grades, {self.matched} joined to {self.decisions} logged calls "
            f"({self.ungraded_decisions} calls without a grade), {len(self.unmatched)} unmatched, "
            f"{self.duplicates} repeated verdicts kept once",
            f"{self.rows} training rows, {self.labels} labels ({self.mixed_labels} averaged over calls graded "
            "differently)",
        ]
        for model, counts in sorted(self.per_model.items()):
            lines.append(f"  {model}: {counts['correct']} correct of {counts['graded']} graded")
        lines.extend(f"  unmatched: {u}" for u in self.unmatched[:20])
        if len(self.unmatched) > 20:
            lines.append(f"  ... and {len(self.unmatched) - 20} more unmatched")
        return "\n".join(lines)


def _verdict(row: dict, where: str, score_threshold: float) -> bool:
    given = [k for k in VERDICTS if k in row]
    if len(given) != 1:
        raise ValueError(
            f"{where}: give exactly one verdict of {list(VERDICTS)}, got {given or 'none'}"
            + (" (they could disagree)" if given else "")
        )
    key, value = given[0], row[given[0]]
    if key == "thumbs":
        normal = value.strip().lower() if isinstance(value, str) else value
        if isinstance(normal, (int, float)) and not isinstance(normal, bool):
            raise ValueError(f"{where}: thumbs must be 'up'/'down' or true/false, got {value!r}")
        if normal not in THUMBS:
            raise ValueError(f"{where}: thumbs must be 'up'/'down' or true/false, got {value!r}")
        return THUMBS[normal]
    if key == "correct":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: correct must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{where}: score must be a number, got {value!r}")
    return float(value) >= score_threshold


def read_grades(path: str | os.PathLike, score_threshold: float = 4.0) -> list[Grade]:
    """Check a grades file line by line; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grades file not found: {path}")
    grades = []
    for number, row in read_jsonl(path):
        where = f"{path}, line {number}"
        if "prompt" in row and "messages" in row:
            raise ValueError(f"{where}: has both 'prompt' and 'messages'; give one")
        query = row.get("prompt", row.get("messages"))
        if query is not None:
            try:
                query = to_conversation(query)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        query_id, digest = row.get("query_id"), row.get("prompt_sha256")
        for name, value in (("query_id", query_id), ("prompt_sha256", digest), ("model", row.get("model"))):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
        if query is not None:
            text_digest = prompt_sha256(query)
            if digest is not None and digest != text_digest:
                raise ValueError(f"{where}: prompt_sha256 does not match the SHA-256 of the given prompt")
            digest = text_digest
        if query_id is None and digest is None:
            raise ValueError(f"{where}: name the graded call: 'query_id', 'prompt_sha256' or the 'prompt' itself")
        grades.append(Grade(where, _verdict(row, where, score_threshold), query_id, digest, query, row.get("model")))
    if not grades:
        raise ValueError(f"{path} holds no grades")
    return grades


def read_prompts(path: str | os.PathLike) -> dict[str, Any]:
    """Prompt texts by their SHA-256 (as the log hashes them), from any JSON Lines of strings or objects
    with ``prompt``/``messages`` (a labelling input, an outcomes file, an application's request log)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    out: dict[str, Any] = {}
    for number, row in read_jsonl(path, objects_only=False):
        query = (
            row if isinstance(row, str) else row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        )
        if query is None:
            raise ValueError(f"{path}, line {number}: expected a string or an object with 'prompt' or 'messages'")
        try:
            conversation = to_conversation(query)
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
        out[prompt_sha256(conversation)] = conversation
    return out


def join_feedback(
    records: Iterable[dict],
    grades: list[Grade],
    *,
    prompts: dict[str, Any] | None = None,
    allow_unmatched: bool = False,
) -> tuple[list[dict], FeedbackReport]:
    """Training rows (outcomes format, graded models only) from decision-log ``records`` and ``grades``."""
    records = list(records)
    report = FeedbackReport(grades=len(grades), decisions=len(records))
    by_id: dict[str, dict] = {}
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for logged in records:
        if logged.get("query_id"):
            by_id[logged["query_id"]] = logged
        if logged.get("prompt_sha256"):
            by_hash[logged["prompt_sha256"]].append(logged)
    prompts = dict(prompts or {})
    # (call key, model) -> (verdict, where): a call is its query id, or its prompt hash when graded by hash
    verdicts: dict[tuple[str, str], tuple[bool, str]] = {}
    texts: dict[str, Any] = {}
    call_hash: dict[str, str] = {}
    graded_calls: set[int] = set()
    for grade in grades:
        problem: str | None = None
        record: dict | None = None
        if grade.query_id is not None:
            record = by_id.get(grade.query_id)
            if record is None:
                problem = f"query_id {grade.query_id!r} is not in the decision log"
            elif grade.prompt_sha256 is not None and grade.prompt_sha256 != record.get("prompt_sha256"):
                raise ValueError(
                    f"{grade.where}: the grade's prompt is not the prompt logged for query_id {grade.query_id!r} "
                    "(their SHA-256 differ)"
                )
            matches = [record] if record is not None else []
        else:
            matches = by_hash.get(grade.prompt_sha256 or "", [])
            if not matches:
                problem = f"no logged call has prompt_sha256 {grade.prompt_sha256}"
        if problem is not None:
            if not allow_unmatched:
                raise ValueError(
                    f"{grade.where}: {problem}; check the log covers this traffic (rotated files are read too) "
                    "or pass allow_unmatched / --allow-unmatched to count such grades and go on"
                )
            report.unmatched.append(f"{grade.where}: {problem}")
            continue
        served = {grade.model or m.get("served_by") for m in matches}
        if None in served:
            raise ValueError(f"{grade.where}: the logged call has no serving model (it failed); name 'model'")
        models = {str(m) for m in served}
        if len(models) > 1:
            raise ValueError(
                f"{grade.where}: the prompt was logged {len(matches)} times, served by {sorted(models)}; "
                "grade by query_id or name 'model'"
            )
        model = models.pop()
        pool = matches[0].get("probabilities") or {}  # the logged router's pool models
        if grade.model is not None and pool and grade.model not in pool:
            raise ValueError(f"{grade.where}: model {grade.model!r} is not in the logged router's pool {sorted(pool)}")
        digest = matches[0]["prompt_sha256"]
        call = grade.query_id if grade.query_id is not None else f"sha256:{digest}"
        previous = verdicts.get((call, model))
        if previous is not None:
            if previous[0] != grade.correct:
                raise ValueError(
                    f"{grade.where}: conflicting grades for {call} ({model}): {grade.correct} here, "
                    f"{previous[0]} at {previous[1]}"
                )
            report.duplicates += 1
            continue
        verdicts[(call, model)] = (grade.correct, grade.where)
        call_hash[call] = digest
        graded_calls.update(id(m) for m in matches)
        report.matched += 1
        query = grade.query if grade.query is not None else prompts.get(digest)
        if query is None and digest not in texts:
            raise ValueError(
                f"{grade.where}: no prompt text for this call: the log keeps only its SHA-256; put 'prompt' "
                "(or 'messages') in the grade, or pass a prompts file that holds it"
            )
        if query is not None:
            texts.setdefault(digest, query)
    report.ungraded_decisions = sum(id(r) not in graded_calls for r in records)
    # one row per prompt: each model's label is the share of its graded calls that were correct
    per_prompt: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    ids: dict[str, list[str]] = defaultdict(list)
    for (call, model), (correct, _) in verdicts.items():
        per_prompt[call_hash[call]][model].append(correct)
        if not call.startswith("sha256:") and call not in ids[call_hash[call]]:
            ids[call_hash[call]].append(call)
    rows = []
    for digest, labels in per_prompt.items():
        query = texts[digest]
        shares = {m: sum(v) / len(v) for m, v in labels.items()}
        hard = all(s in (0.0, 1.0) for s in shares.values())
        report.mixed_labels += sum(s not in (0.0, 1.0) for s in shares.values())
        row: dict[str, Any] = {"id": ids[digest][0] if ids[digest] else f"sha256:{digest[:16]}"}
        if len(query) == 1 and query[0]["role"] == "user":
            row["prompt"] = query[0]["content"]
        else:
            row["messages"] = query
        row["correct" if hard else "scores"] = {m: (bool(s) if hard else s) for m, s in shares.items()}
        row["feedback"] = {
            "prompt_sha256": digest,
            "query_ids": ids[digest],
            "grades": {m: len(v) for m, v in labels.items()},
        }
        rows.append(row)
        for name, v in labels.items():
            counts = report.per_model.setdefault(name, {"graded": 0, "correct": 0})
            counts["graded"] += len(v)
            counts["correct"] += sum(v)
    report.rows = len(rows)
    report.labels = sum(len(r.get("correct", r.get("scores", {}))) for r in rows)
    return rows, report


def feedback_to_file(
    log: str | os.PathLike,
    grades: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prompts: str | os.PathLike | None = None,
    score_threshold: float = 4.0,
    allow_unmatched: bool = False,
) -> FeedbackReport:
    """Read the log (rotated files too), the grades and the optional prompts file; write the rows to ``out``."""
    rows, report = join_feedback(
        read_log(log),
        read_grades(grades, score_threshold),
        prompts=read_prompts(prompts) if prompts is not None else None,
        allow_unmatched=allow_unmatched,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    return report
