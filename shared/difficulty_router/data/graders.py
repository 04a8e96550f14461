"""Graders for ``difficulty-router label``: is a model's answer right?

Reference graders compare the answer with the row's ``reference``: ``exact`` (case- and
space-insensitive), ``choice`` (the multiple-choice letter the answer commits to),
``number`` (the last number in the answer, within a relative/absolute tolerance), ``regex``
(the reference is a pattern the answer must match). Any callable ``(answer, reference) ->
bool | float in [0, 1]`` is a grader too, so users plug in their own.

The judge grader asks an LLM from the pool config to score the answer 1-5 against a rubric
(RouteLLM's GSM8K/MT-Bench labels were made this way) and maps score >= threshold to correct.
A judge reply that carries no score is :class:`JudgeParseError`: the labeller records the
row as skipped with that reason instead of guessing or crashing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

Grader = Callable[[str, Any], "bool | float"]


class JudgeParseError(ValueError):
    """The judge's reply held no usable 1-5 score."""


def _normal(text: str) -> str:
    return " ".join(str(text).strip().lower().split()).rstrip(".")


def grade_exact(answer: str, reference: Any) -> bool:
    return _normal(answer) == _normal(reference)


_CHOICE_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"^\s*\(?([A-J])\)?(?:[.):]|\s*$)"),  # "C.", "(C)", "C" alone; not "I am ..."
    re.compile(r"\(([A-J])\)"),
)


def extract_choice(answer: str) -> str | None:
    """The letter an answer commits to: "The answer is (C)", "C.", "(C)"; None when there is none."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.search(str(answer))
        if found:
            return found.group(1).upper()
    return None


def grade_choice(answer: str, reference: Any) -> bool:
    letter = str(reference).strip().strip("()").upper()
    if not re.fullmatch(r"[A-J]", letter):
        raise ValueError(f"the choice grader needs a reference letter A-J, got {reference!r}")
    return extract_choice(answer) == letter


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def extract_number(answer: str) -> float | None:
    """The last number in the answer (thousands separators allowed), the usual final-answer convention."""
    found = _NUMBER.findall(str(answer))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def number_grader(rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> Grader:
    def grade_number(answer: str, reference: Any) -> bool:
        try:
            expected = float(str(reference).replace(",", ""))
        except ValueError:
            raise ValueError(f"the number grader needs a numeric reference, got {reference!r}") from None
        got = extract_number(answer)
        return got is not None and math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)

    return grade_number


def grade_regex(answer: str, reference: Any) -> bool:
    try:
        return re.search(str(reference), str(answer), flags=re.IGNORECASE | re.DOTALL) is not None
    except re.error as exc:
        raise ValueError(f"the regex grader's reference {reference!r} is not a valid pattern ({exc})") from None


GRADERS: dict[str, Grader] = {
    "exact": grade_exact,
    "choice": grade_choice,
    "number": number_grader(),
    "regex": grade_regex,
}


def get_grader(name_or_callable: str | Grader) -> Grader:
    if callable(name_or_callable):
        return name_or_callable
    if name_or_callable not in GRADERS:
        raise ValueError(f"unknown grader {name_or_callable!r}; expected one of {sorted(GRADERS)} or a callable")
    return GRADERS[name_or_callable]


# -- the LLM judge ----------------------------------------------------------------------------
DEFAULT_RUBRIC = (
    "Rate how well the answer responds to the question: 5 = fully correct and complete, 4 = correct with "
    "minor flaws, 3 = partly correct, 2 = mostly wrong, 1 = wrong or no answer."
)
JUDGE_TEMPLATE = (
    "You are grading an answer.\n{rubric}\n\n[Question]\n{question}\n\n{reference_block}[Answer]\n{answer}\n\n"
    'Reply with the score only, as "Score: N" where N is 1, 2, 3, 4 or 5.'
)
_SCORE = re.compile(r"(?:score|rating)\s*[:=]?\s*\**\s*([1-5])(?:\s*/\s*5)?\b", re.IGNORECASE)
_BARE = re.compile(r"^\s*\**\s*([1-5])\s*\**\s*(?:/\s*5)?\s*\.?\s*$")


def judge_prompt(question: str, answer: str, reference: Any = None, rubric: str = DEFAULT_RUBRIC) -> str:
    reference_block = f"[Reference answer]\n{reference}\n\n" if reference is not None else ""
    return JUDGE_TEMPLATE.format(rubric=rubric, question=question, reference_block=reference_block, answer=answer)


def parse_judge_score(reply: str) -> int:
    """The 1-5 score in a judge's reply ("Score: 4", "Rating: 4/5", or just "4")."""
    if reply is None or not str(reply).strip():
        raise JudgeParseError("the judge's reply is empty")
    text = str(reply)
    found = _SCORE.search(text) or _BARE.match(text)
    if not found:
        raise JudgeParseError(f"the judge's reply holds no 1-5 score: {text.strip()[:120]!r}")
    return int(found.group(1))
