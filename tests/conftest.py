"""Shared fixtures: the real embedded extractor (SmolLM2-135M) and a router trained on the shipped sample.

Both are session-scoped: the model loads once (under a second after the first GGUF
dequantisation) and the router trains once on 240 real RouteLLM MMLU rows.
"""

from __future__ import annotations

import pytest

from difficulty_router import ActivationExtractor, ModelPool, load_outcomes, train_router
from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"


@pytest.fixture(scope="session")
def extractor() -> ActivationExtractor:
    return ActivationExtractor("smollm2-135m", layers=15, pooling="last")


@pytest.fixture(scope="session")
def sample_outcomes():
    return load_outcomes(ROUTELLM_MMLU_SAMPLE)


@pytest.fixture(scope="session")
def sample_pool() -> ModelPool:
    return ModelPool.load(ROUTELLM_MMLU_POOL)


@pytest.fixture(scope="session")
def trained_router(extractor, sample_outcomes, sample_pool):
    """A real router: real extractor, real probes, fixed read-out (layer 15, last token) to keep it quick."""
    train = sample_outcomes.subset(range(240))
    return train_router(train, sample_pool, extractor, layers=[15], pooling="last", cv=3, progress=False)


@pytest.fixture(scope="session")
def llama_backends():
    """Two real OpenAI-compatible backends (llama-cpp-python's server on SmolLM2-135M, one thread each).

    Yields ``{"small": base_url, "large": base_url}``; each serves the model under its alias.
    Both run the same GGUF: the tests check plumbing (routing, streaming, fallback), not quality.
    """
    from contextlib import ExitStack

    from llama_servers import llama_server, smollm2_gguf

    gguf = smollm2_gguf()
    with ExitStack() as stack:
        yield {alias: stack.enter_context(llama_server(gguf, alias)) for alias in ("small", "large")}
