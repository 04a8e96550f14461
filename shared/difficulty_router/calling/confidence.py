"""P(T): how sure a model was of the answer it generated, from its token log-probabilities.

This is the black-box half of the cascade's confidence (Chen, Chen & Yen 2026): any
endpoint that returns ``logprobs`` gives it, hidden states or not. The answer span is the
generated text without leading whitespace tokens, so "first" means the first token that
carries the answer (for a multiple-choice reply, the letter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

REDUCTIONS = ("first", "mean", "min")


class MissingLogprobsError(ValueError):
    """The backend returned no token log-probabilities, so P(T) cannot be computed."""


def answer_span(tokens: Sequence[str] | None, logprobs: Sequence[float]) -> list[float]:
    """Log-probabilities of the answer tokens: leading whitespace-only tokens dropped."""
    logprobs = [float(x) for x in logprobs]
    if tokens is None or len(tokens) != len(logprobs):
        return logprobs
    start = 0
    while start < len(tokens) - 1 and not str(tokens[start]).strip():
        start += 1
    return logprobs[start:]


def answer_confidence(logprobs: Sequence[float], reduce: str = "first", tokens: Sequence[str] | None = None) -> float:
    """P(T) in [0, 1]: exp of the first, mean or minimum log-probability over the answer span."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; expected one of {REDUCTIONS}")
    span = answer_span(tokens, logprobs)
    if not span:
        raise MissingLogprobsError("the answer has no tokens with log-probabilities")
    bad = [x for x in span if not math.isfinite(x) and x != -math.inf]
    if bad:
        raise ValueError(f"log-probabilities must be real numbers, got {bad[:3]}")
    if any(x > 1e-3 for x in span):
        raise ValueError(f"log-probabilities must be <= 0, got {max(span):g}; were probabilities passed instead?")
    if reduce == "first":
        value = span[0]
    elif reduce == "mean":
        value = sum(span) / len(span)
    else:
        value = min(span)
    return float(min(1.0, math.exp(value)))


def openai_token_logprobs(source: Any) -> tuple[list[str], list[float]]:
    """Tokens and log-probabilities from an OpenAI-style chat completion.

    Accepts a ``ChatCompletion``, one of its choices, the choice's ``logprobs`` object, or
    the equivalent plain dicts (LangChain puts the latter in ``response_metadata["logprobs"]``).
    Raises :class:`MissingLogprobsError` when the endpoint sent none (it was not asked, or
    does not support them).
    """
    obj = _get(source, "choices")
    if obj is not None:
        if not obj:
            raise MissingLogprobsError("the completion has no choices")
        source = obj[0]
    inner = _get(source, "logprobs")
    if inner is not None or _get(source, "message") is not None or _get(source, "finish_reason") is not None:
        source = inner
    if source is None:
        raise MissingLogprobsError(
            "the response carries no logprobs; request them with logprobs=True, or the endpoint does not support them"
        )
    content = _get(source, "content")
    if content is None and isinstance(source, (list, tuple)):
        content = source
    if not content:
        raise MissingLogprobsError("the response's logprobs hold no token entries")
    tokens, values = [], []
    for entry in content:
        token, logprob = _get(entry, "token"), _get(entry, "logprob")
        if logprob is None:
            raise MissingLogprobsError(f"a logprobs entry has no 'logprob': {entry!r}")
        tokens.append("" if token is None else str(token))
        values.append(float(logprob))
    return tokens, values


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)
