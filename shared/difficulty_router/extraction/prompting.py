"""From a query to the token ids the extractor reads: chat template, generation prompt, truncation.

Truncation keeps the *end* of the templated prompt (the generation prompt is where the read-out
happens, and the question usually sits just before it). A prompt far longer than ``max_tokens``
is never tokenised whole: only a tail of its text is, sized from ``max_tokens`` and grown until it
yields enough tokens, so a 2 MB paste costs about what a ``max_tokens`` one does. The ids kept are
the same as tokenising the whole text and keeping its last ``max_tokens``: the tail starts at
whitespace and the few tokens at the cut, which may split differently, are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from difficulty_router.data.queries import Conversation, to_conversations

#: Tokens dropped after the cut: a token (or a special token's text) split by the cut tokenises
#: differently, and a byte-level pre-tokeniser re-synchronises within a word or two.
CUT_MARGIN_TOKENS = 16
#: First guess of characters per token for the tail to tokenise (English runs ~4; grown if short).
CHARS_PER_TOKEN_GUESS = 8
#: How far a tail may grow looking for whitespace to start at, as a multiple of the first budget.
MAX_TAIL_GROWTH = 16
_WHITESPACE = re.compile(r"\s")


class PromptTokenizer:
    """Renders conversations with the model's chat template and tokenises them, left-truncated."""

    def __init__(self, tokenizer, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.prefix_ids = self._fixed_prefix()

    def render(self, conversation: Conversation) -> str:
        """The exact text the model reads: chat template plus generation prompt."""
        tokenizer = self.tokenizer
        if self.templated:
            try:
                return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            except Exception:  # noqa: BLE001 (templates that reject tool/developer roles: map them to ones they know)
                mapped = [
                    {
                        "role": {"tool": "user", "function": "user", "developer": "system"}.get(m["role"], m["role"]),
                        "content": m["content"]
                        if m["role"] not in ("tool", "function")
                        else f"Tool result:\n{m['content']}",
                    }
                    for m in conversation
                ]
                return tokenizer.apply_chat_template(mapped, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of whole texts (the only place the tokenizer runs)."""
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=not self.templated)["input_ids"]]

    def tokenize(self, queries: Sequence[Any]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per query (left-truncated to max_tokens) and whether each was truncated."""
        texts = [self.render(c) for c in to_conversations(queries)]
        ids: list[list[int] | None] = [None] * len(texts)
        truncated = np.zeros(len(texts), dtype=bool)
        budget = (self.max_tokens + CUT_MARGIN_TOKENS) * CHARS_PER_TOKEN_GUESS
        short = [i for i, t in enumerate(texts) if len(t) <= budget]
        for i, x in zip(short, self.encode([texts[i] for i in short]), strict=False):
            truncated[i] = len(x) > self.max_tokens
            ids[i] = x[-self.max_tokens :]
        for i, text in enumerate(texts):
            if ids[i] is None:
                ids[i], truncated[i] = self._tail(text, budget)
        filled = [x for x in ids if x is not None]
        assert len(filled) == len(ids)  # every slot is filled by one of the two loops
        return filled, truncated

    def _tail(self, text: str, budget: int) -> tuple[list[int], bool]:
        """The last max_tokens ids of ``text``, tokenising only a growing tail of it.

        The tail starts at whitespace, where byte-level pre-tokenisers split, because BPE merges
        inside one pre-token are not local: a word cut in two can tokenise differently to its end.
        A tail with no whitespace in its first half grows; past ``MAX_TAIL_GROWTH`` times the first
        budget it is cut anywhere (ids may then differ from a full pass inside that one giant "word").
        """
        first = budget
        while budget < len(text):
            start = len(text) - budget
            space = _WHITESPACE.search(text, start, start + budget // 2)
            if space is None and budget < first * MAX_TAIL_GROWTH:
                budget *= 2
                continue
            x = self.encode([text[space.start() if space else start :]])[0]
            if len(x) >= self.max_tokens + CUT_MARGIN_TOKENS:
                return x[-self.max_tokens :], True  # the whole text has more tokens than this tail
            budget *= 2
        x = self.encode([text])[0]
        return x[-self.max_tokens :], len(x) > self.max_tokens

    def _fixed_prefix(self) -> tuple[int, ...]:
        """Token ids every single-user-message prompt starts with (e.g. a default system prompt).

        Found as the common prefix of two rendered probes; a prompt uses it only where its own
        ids start with it, so a template that renders some prompts differently is still exact.
        """
        probes = self.encode([self.render([{"role": "user", "content": c}]) for c in ("Abc?", "xyz")])
        common = 0
        for a, b in zip(*probes, strict=False):
            if a != b:
                break
            common += 1
        return tuple(probes[0][: max(common - 1, 0)])  # the last shared id may merge with some contents
