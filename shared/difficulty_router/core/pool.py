"""The candidate models and what a call to each costs.

A model is priced either per query (``cost_per_query``) or per token
(``input_cost_per_1m`` / ``output_cost_per_1m`` with ``expected_output_tokens``). Prompt
tokens are estimated at 4 characters a token, since the pool's own tokenizers are unknown
here; logged per-query costs in the outcomes take precedence in evaluation.

A model may also say where it is served, for ``difficulty-router serve``: ``base_url`` of an
OpenAI-compatible endpoint, ``model`` (the endpoint's own model name, default the pool name),
``api_key_env`` (the name of the environment variable holding its key, never the key itself, so
pool files can be committed) and ``timeout`` in seconds.

Real bills count three kinds of tokens: fresh input, cached input (the provider's prompt cache,
``cached_input_cost_per_1m``, typically 10-50% of the input price) and output. Token counts come
from the extractor's tokenizer times ``tokens_per_extractor_token`` (the model's own tokens per
extractor token; 1 unless you measured it). Pools without them keep routing offline.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHARS_PER_TOKEN = 4.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class PoolModel:
    name: str
    cost_per_query: float | None = None
    input_cost_per_1m: float | None = None
    output_cost_per_1m: float | None = None
    expected_output_tokens: float | None = None
    # The provider's price for input tokens read from its prompt cache (default: the full input price).
    cached_input_cost_per_1m: float | None = None
    # This model's tokens per extractor token, to turn the extractor's token counts into the model's own.
    tokens_per_extractor_token: float = 1.0
    # Where the model is served (optional; only ``difficulty-router serve`` needs them).
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"pool model name must be a non-empty string, got {self.name!r}")
        self._check_backend()
        for key in (
            "cost_per_query",
            "input_cost_per_1m",
            "output_cost_per_1m",
            "expected_output_tokens",
            "cached_input_cost_per_1m",
            "tokens_per_extractor_token",
        ):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"pool model {self.name!r}: {key} must be a finite non-negative number, got {value!r}")
        priced_by_token = self.input_cost_per_1m is not None or self.output_cost_per_1m is not None
        if self.cost_per_query is None and not priced_by_token:
            raise ValueError(
                f"pool model {self.name!r} has no cost: give cost_per_query, "
                "or input_cost_per_1m and output_cost_per_1m"
            )
        if self.cost_per_query is not None and priced_by_token:
            raise ValueError(f"pool model {self.name!r}: give cost_per_query or token prices, not both")
        if priced_by_token and (self.input_cost_per_1m is None or self.output_cost_per_1m is None):
            raise ValueError(
                f"pool model {self.name!r}: token pricing needs both input_cost_per_1m and output_cost_per_1m"
            )
        if self.cached_input_cost_per_1m is not None and not priced_by_token:
            raise ValueError(f"pool model {self.name!r}: cached_input_cost_per_1m needs token prices, not per-query")
        if self.tokens_per_extractor_token <= 0:
            raise ValueError(f"pool model {self.name!r}: tokens_per_extractor_token must be > 0")

    def _check_backend(self) -> None:
        if self.base_url is not None and (
            not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://"))
        ):
            raise ValueError(
                f"pool model {self.name!r}: base_url must be an http:// or https:// URL, got {self.base_url!r}"
            )
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ValueError(f"pool model {self.name!r}: model must be a non-empty string, got {self.model!r}")
        if self.api_key_env is not None and (
            not isinstance(self.api_key_env, str) or not _ENV_NAME.match(self.api_key_env)
        ):
            raise ValueError(
                f"pool model {self.name!r}: api_key_env must name an environment variable "
                f"(letters, digits, underscores), got {self.api_key_env!r}"
            )
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or not math.isfinite(self.timeout)
            or self.timeout <= 0
        ):
            raise ValueError(
                f"pool model {self.name!r}: timeout must be a positive number of seconds, got {self.timeout!r}"
            )
        if self.base_url is None and any(v is not None for v in (self.model, self.api_key_env, self.timeout)):
            raise ValueError(
                f"pool model {self.name!r}: model, api_key_env and timeout describe a backend; give base_url too"
            )

    @property
    def served_model(self) -> str:
        """The name the backend itself knows this model by."""
        return self.model or self.name

    def cost(
        self,
        prompt_chars: float | None = None,
        *,
        input_tokens: float | None = None,
        cached_tokens: float = 0.0,
        output_tokens: float | None = None,
    ) -> float:
        """Expected cost of one call.

        The prompt is given either as ``prompt_chars`` (estimated at 4 characters a token) or as
        ``input_tokens`` counted by the extractor's tokenizer (scaled by ``tokens_per_extractor_token``);
        ``cached_tokens`` of them (same tokenizer) are read from the provider's prompt cache at
        ``cached_input_cost_per_1m``. ``output_tokens`` (the model's own tokens, e.g. predicted by the
        router's length head) defaults to ``expected_output_tokens``, else 256.
        """
        if (prompt_chars is None) == (input_tokens is None):
            raise ValueError("give the prompt as prompt_chars or input_tokens (exactly one)")
        size = prompt_chars if prompt_chars is not None else input_tokens
        for what, value in (("prompt size", size), ("cached_tokens", cached_tokens), ("output_tokens", output_tokens)):
            if value is not None and (isinstance(value, bool) or not math.isfinite(value) or value < 0):
                raise ValueError(f"pool model {self.name!r}: {what} must be a finite number >= 0, got {value!r}")
        if self.cost_per_query is not None:
            return float(self.cost_per_query)
        if output_tokens is None:
            output_tokens = self.expected_output_tokens if self.expected_output_tokens is not None else 256.0
        input_price, output_price = self.input_cost_per_1m or 0.0, self.output_cost_per_1m or 0.0  # validated at load
        if prompt_chars is not None:
            return (prompt_chars / CHARS_PER_TOKEN) * input_price / 1e6 + output_tokens * output_price / 1e6
        assert input_tokens is not None
        if cached_tokens > input_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) exceed the prompt's input_tokens ({input_tokens})")
        cached_price = self.cached_input_cost_per_1m if self.cached_input_cost_per_1m is not None else input_price
        ratio = self.tokens_per_extractor_token
        fresh = (input_tokens - cached_tokens) * ratio
        return (fresh * input_price + cached_tokens * ratio * cached_price + output_tokens * output_price) / 1e6


@dataclass(frozen=True)
class ModelPool:
    models: tuple[PoolModel, ...]

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"a pool needs at least two models to route between, got {len(self.models)}")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names models more than once: {dupes}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, name: str) -> PoolModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"model {name!r} is not in the pool {self.names}")

    def costs(self, prompt_chars, output_tokens=None) -> np.ndarray:
        """(n_queries, n_models) expected cost matrix; ``output_tokens`` (n_queries, n_models), e.g. from the
        router's length head, replaces each model's constant ``expected_output_tokens``."""
        prompt_chars = np.atleast_1d(np.asarray(prompt_chars, dtype=np.float64))
        if output_tokens is None:
            return np.array([[m.cost(c) for m in self.models] for c in prompt_chars])
        output_tokens = np.asarray(output_tokens, dtype=np.float64)
        if output_tokens.shape != (len(prompt_chars), len(self.models)):
            raise ValueError(
                f"output_tokens has shape {output_tokens.shape}, expected {(len(prompt_chars), len(self))}"
            )
        return np.array(
            [
                [m.cost(c, output_tokens=float(t)) for m, t in zip(self.models, row, strict=True)]
                for c, row in zip(prompt_chars, output_tokens, strict=True)
            ]
        )

    def check_against(self, model_names: list[str], what: str = "the outcomes") -> None:
        missing = [m for m in self.names if m not in model_names]
        if missing:
            raise ValueError(f"pool models {missing} are absent from {what} (which has {model_names})")

    def to_dict(self) -> dict:
        defaults = {"tokens_per_extractor_token": 1.0}  # left out at their default, so old manifests stay identical
        return {
            "models": [
                {k: v for k, v in asdict(m).items() if v is not None and defaults.get(k) != v} for m in self.models
            ]
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "pool") -> ModelPool:
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise ValueError(f"{source}: expected an object with a 'models' list")
        allowed = set(PoolModel.__dataclass_fields__)
        models = []
        for i, entry in enumerate(data["models"]):
            if not isinstance(entry, dict):
                raise ValueError(f"{source}: models[{i}] must be an object")
            unknown = sorted(set(entry) - allowed)
            if unknown:
                raise ValueError(f"{source}: models[{i}] has unknown keys {unknown} (allowed: {sorted(allowed)})")
            if "name" not in entry:
                raise ValueError(f"{source}: models[{i}] has no 'name'")
            try:
                models.append(PoolModel(**entry))
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
        return cls(tuple(models))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelPool:
        """Read a pool file: JSON, or YAML when the name ends in .yaml/.yml."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pool file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_costs(cls, costs: dict[str, float]) -> ModelPool:
        return cls(tuple(PoolModel(name=n, cost_per_query=c) for n, c in costs.items()))
