"""LlamaIndex's own instrumentation events, recorded: what the LlamaIndex tests read to see which
candidate LLM actually ran and which spans and events the router emitted."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llama_index.core.instrumentation.event_handlers import BaseEventHandler


class Recorder(BaseEventHandler):
    """Keeps every event the root dispatcher sends (the ``recorder`` fixture in conftest adds and removes it)."""

    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)

    def named(self, name: str) -> list:
        return [e for e in self.events if type(e).__name__ == name]

    def names(self) -> Counter:
        return Counter(type(e).__name__ for e in self.events)

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]
