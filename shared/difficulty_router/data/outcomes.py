"""Outcomes files: which model answered which query well, one JSON object per line.

Each line has ``prompt`` (string) or ``messages`` (chat conversation), and ``correct``
(model -> bool/0/1) or ``scores`` (model -> number in [0, 1]); optionally ``id``,
``difficulty`` (1-5) and ``cost`` (model -> what that query actually cost). Every
problem is reported with its line number: a silent default here would skew training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from difficulty_router.data.jsonl import open_text, read_jsonl, write_jsonl
from difficulty_router.data.queries import Conversation, to_conversation


@dataclass
class Outcomes:
    """Queries with a (n_queries, n_models) score matrix in [0, 1]."""

    queries: list[Conversation]
    models: list[str]
    scores: np.ndarray
    ids: list[str]
    difficulty: np.ndarray | None = None  # (n,) ints 1-5, 0 where unlabelled
    cost: np.ndarray | None = None  # (n, m) actual costs, NaN where not logged
    extra: dict[str, list] = field(default_factory=dict)  # per-row fields loaders keep (subject, ...)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        n = len(self.queries)
        if self.scores.shape != (n, len(self.models)):
            raise ValueError(f"scores has shape {self.scores.shape}, expected ({n}, {len(self.models)})")
        if len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} queries")

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, index) -> Outcomes:
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return Outcomes(
            queries=[self.queries[i] for i in index],
            models=list(self.models),
            scores=self.scores[index],
            ids=[self.ids[i] for i in index],
            difficulty=None if self.difficulty is None else self.difficulty[index],
            cost=None if self.cost is None else self.cost[index],
            extra={k: [v[i] for i in index] for k, v in self.extra.items()},
        )

    def select_models(self, names: list[str]) -> Outcomes:
        missing = [m for m in names if m not in self.models]
        if missing:
            raise ValueError(f"models {missing} are not in the outcomes (have {self.models})")
        cols = [self.models.index(m) for m in names]
        out = self.subset(np.arange(len(self)))
        out.models = list(names)
        out.scores = self.scores[:, cols]
        out.cost = None if self.cost is None else self.cost[:, cols]
        return out

    def split(self, train_fraction: float, seed: int = 0) -> tuple[Outcomes, Outcomes]:
        """A seeded random split into (train, test)."""
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
        order = np.random.default_rng(seed).permutation(len(self))
        cut = round(train_fraction * len(self))
        return self.subset(np.sort(order[:cut])), self.subset(np.sort(order[cut:]))

    def accuracy(self) -> dict[str, float]:
        return {m: float(self.scores[:, j].mean()) for j, m in enumerate(self.models)}

    def summary(self) -> dict:
        return {
            "n": len(self),
            "models": list(self.models),
            "mean_score": self.accuracy(),
            "has_difficulty": self.difficulty is not None,
            "has_cost": self.cost is not None,
        }


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{where} is NaN")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{where} is {value}, outside [0, 1]")
        return float(value)
    raise ValueError(f"{where} must be a bool or a number in [0, 1], got {value!r}")


def parse_outcome_rows(
    rows: Iterable[tuple[int, Any]], source: str = "outcomes", *, models: Sequence[str] | None = None
) -> Outcomes:
    """Validate already-decoded ``(line number, row)`` pairs; ``source`` names them in errors.

    ``models`` None: the first row's models are the outcomes' models and every row must label each of
    them. ``models`` given (the router's pool, for ``train --update``): a row may label any non-empty subset
    of them, the labels it leaves out are NaN, and a model outside them is an error naming the line.
    """
    queries, ids, table, difficulty = [], [], [], []
    costs: list[list[float] | None] = []
    partial = models is not None
    models = list(models) if models is not None else None
    for lineno, row in rows:
        where = f"{source}, line {lineno}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "prompt" in row and "messages" in row:
            raise ValueError(f"{where}: has both 'prompt' and 'messages'; give one")
        if "prompt" not in row and "messages" not in row:
            raise ValueError(f"{where}: missing 'prompt' (string) or 'messages' (chat conversation)")
        try:
            queries.append(to_conversation(row.get("prompt", row.get("messages"))))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        key = "correct" if "correct" in row else "scores" if "scores" in row else None
        if key is None:
            raise ValueError(f"{where}: missing 'correct' (model -> bool) or 'scores' (model -> [0, 1])")
        outcome = row[key]
        if not isinstance(outcome, dict) or not outcome:
            raise ValueError(f"{where}: '{key}' must be a non-empty object mapping model -> outcome")
        if models is None:
            models = list(outcome)
        elif partial:
            unknown = sorted(set(outcome) - set(models))
            if unknown:
                raise ValueError(f"{where}: '{key}' names {unknown}, which are not in the router's pool {models}")
        elif set(outcome) != set(models):
            extra, missing = sorted(set(outcome) - set(models)), sorted(set(models) - set(outcome))
            raise ValueError(
                f"{where}: '{key}' names models {sorted(outcome)}, but earlier lines name {sorted(models)}"
                + (f"; unknown here: {extra}" if extra else "")
                + (f"; missing here: {missing}" if missing else "")
            )
        table.append([_score(outcome[m], f"{where}: {key}[{m!r}]") if m in outcome else math.nan for m in models])
        ids.append(str(row.get("id", lineno)))
        level = row.get("difficulty")
        if level is not None and (isinstance(level, bool) or level not in (1, 2, 3, 4, 5)):
            raise ValueError(f"{where}: difficulty must be an integer 1-5, got {level!r}")
        difficulty.append(int(level) if level is not None else 0)
        cost = row.get("cost")
        if cost is not None:
            if not isinstance(cost, dict):
                raise ValueError(f"{where}: 'cost' must be an object mapping model -> cost")
            unknown = sorted(set(cost) - set(models))
            if unknown:
                raise ValueError(f"{where}: 'cost' names unknown models {unknown}")
            for m, c in cost.items():
                if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c) or c < 0:
                    raise ValueError(f"{where}: cost[{m!r}] must be a finite non-negative number, got {c!r}")
            costs.append([float(cost.get(m, math.nan)) for m in models])
        else:
            costs.append(None)
    if models is None or not queries:
        raise ValueError(f"{source} holds no rows")
    any_cost = any(c is not None for c in costs)
    cost_matrix = (
        np.array([c if c is not None else [math.nan] * len(models) for c in costs], dtype=np.float64)
        if any_cost
        else None
    )
    return Outcomes(
        queries=queries,
        models=models,
        scores=np.array(table, dtype=np.float64),
        ids=ids,
        difficulty=np.array(difficulty, dtype=np.int64) if any(difficulty) else None,
        cost=cost_matrix,
    )


def load_outcomes(path: str | os.PathLike) -> Outcomes:
    """Read an outcomes JSON Lines file (optionally .gz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"outcomes file not found: {path}")
    return parse_outcome_rows(read_jsonl(path), source=str(path))


def save_outcomes(outcomes: Outcomes, path: str | os.PathLike) -> None:
    """Write the canonical JSON Lines form (gzip when the name ends in .gz)."""
    write_jsonl(path, (_outcome_row(outcomes, i) for i in range(len(outcomes))))


def _outcome_row(outcomes: Outcomes, i: int) -> dict[str, Any]:
    """Row ``i`` of ``outcomes`` in the file format :func:`load_outcomes` reads."""
    conv = outcomes.queries[i]
    row: dict[str, Any] = {"id": outcomes.ids[i]}
    if len(conv) == 1 and conv[0]["role"] == "user":
        row["prompt"] = conv[0]["content"]
    else:
        row["messages"] = conv
    scores = outcomes.scores[i]
    if np.isin(scores, (0.0, 1.0)).all():
        row["correct"] = {m: bool(s) for m, s in zip(outcomes.models, scores, strict=False)}
    else:
        row["scores"] = {m: float(s) for m, s in zip(outcomes.models, scores, strict=False)}
    if outcomes.difficulty is not None and outcomes.difficulty[i]:
        row["difficulty"] = int(outcomes.difficulty[i])
    if outcomes.cost is not None:
        row["cost"] = {
            m: float(c) for m, c in zip(outcomes.models, outcomes.cost[i], strict=False) if not math.isnan(c)
        }
    for key, values in outcomes.extra.items():
        row.setdefault(key, values[i])
    return row


# -- converters for public routing data ------------------------------------------------
LETTERS = "ABCDEFGHIJKLMNOP"


def mmlu_pro_prompt(question: str, options: list[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def load_mmlu_pro(directory: str | os.PathLike, models: list[str] | None = None) -> Outcomes:
    """MMLU-Pro (TIGER-AI-Lab eval_results): questions.jsonl.gz + correct.csv.gz (+ output_chars.csv.gz).

    Rows where any selected model has no record are dropped (the count is in ``extra``-free
    summary via len); ``extra`` keeps ``category`` and the gold ``answer`` letter, and
    ``output_chars`` holds each model's answer length for token-priced cost estimates.
    """
    import csv

    directory = Path(directory)
    for name in ("questions.jsonl.gz", "correct.csv.gz"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected the MMLU-Pro export)")
    questions = {str(q["question_id"]): q for _, q in read_jsonl(directory / "questions.jsonl.gz")}

    def read_matrix(name):
        with open_text(directory / name) as fh:
            reader = csv.reader(fh)
            header = next(reader)
            return header[1:], {row[0]: row[1:] for row in reader}

    all_models, correct = read_matrix("correct.csv.gz")
    models = list(models or all_models)
    unknown = [m for m in models if m not in all_models]
    if unknown:
        raise ValueError(f"models {unknown} are not in {directory / 'correct.csv.gz'}")
    cols = [all_models.index(m) for m in models]
    chars = read_matrix("output_chars.csv.gz")[1] if (directory / "output_chars.csv.gz").is_file() else {}
    queries, ids, table, extra_cat, extra_ans, out_chars = [], [], [], [], [], []
    for qid, row in correct.items():
        picked = [row[c] for c in cols]
        if any(v == "" for v in picked) or qid not in questions:
            continue
        q = questions[qid]
        queries.append([{"role": "user", "content": mmlu_pro_prompt(q["question"], q["options"])}])
        ids.append(qid)
        table.append([float(v) for v in picked])
        extra_cat.append(q.get("category", ""))
        extra_ans.append(q.get("answer", ""))
        if qid in chars:
            out_chars.append([float(chars[qid][c] or 0) for c in cols])
    outcomes = Outcomes(
        queries=queries,
        models=models,
        scores=np.array(table),
        ids=ids,
        extra={"category": extra_cat, "answer": extra_ans},
    )
    if len(out_chars) == len(ids):
        outcomes.extra["output_chars"] = out_chars
    return outcomes


def load_llmrouter(path: str | os.PathLike) -> Outcomes:
    """An LLMRouter split (train/test.jsonl.gz): ``question``, ``scores`` (model -> 0..1), ``cluster_id``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLMRouter split not found: {path}")

    def rows():
        for lineno, raw in read_jsonl(path):
            yield lineno, {"prompt": raw["question"], "scores": raw["scores"], "id": f"{path.stem}-{lineno}"}

    return parse_outcome_rows(rows(), source=str(path))
