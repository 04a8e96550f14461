"""Shared fixtures: the real embedded extractor (SmolLM2-135M) and a router trained on the shipped sample.

Both are session-scoped: the model loads once (under a second after the first GGUF
dequantisation) and the router trains once on 240 real RouteLLM MMLU rows.
"""

from __future__ import annotations

import pytest
import torch

from difficulty_router import ActivationExtractor, ModelPool, load_outcomes, train_router
from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"


#: How far P(success) may move when the same query is routed in another batch composition (left
#: padding changes the kernels' summation order; see difficulty_router.extractor.FEATURE_RTOL):
#: measured at most 6e-7 in float32 and 7e-3 in bfloat16.
PROBA_ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def proba_atol(router) -> float:
    """The tolerance for comparing one query's probabilities routed alone and in a batch."""
    return PROBA_ATOL[router.extractor.dtype]


@pytest.fixture(scope="session")
def extractor() -> ActivationExtractor:
    """The extractor as users get it: dtype "auto" (bf16 on CPUs with native bf16, else float32)."""
    return ActivationExtractor("smollm2-135m", layers=15, pooling="last")


@pytest.fixture(scope="session")
def extractors_by_dtype(extractor) -> dict[str, ActivationExtractor]:
    """One extractor per numeric path, whatever this CPU picks for "auto": bf16 runs everywhere
    (emulated where the CPU has no native bf16), so both paths are tested on every machine."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[name] = extractor if extractor.dtype == dtype else ActivationExtractor(
            "smollm2-135m", layers=15, pooling="last", dtype=name)
    return out


@pytest.fixture(params=["float32", "bfloat16"])
def any_dtype_extractor(request, extractors_by_dtype) -> ActivationExtractor:
    return extractors_by_dtype[request.param]


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


def _small_and_large(chat_format: str | None = None):
    """Yields ``{"small": base_url, "large": base_url}``: two llama.cpp servers on the embedded GGUF."""
    from contextlib import ExitStack

    from llama_servers import llama_server, smollm2_gguf

    gguf = smollm2_gguf()
    with ExitStack() as stack:
        yield {alias: stack.enter_context(llama_server(gguf, alias, chat_format=chat_format))
               for alias in ("small", "large")}


@pytest.fixture(scope="session")
def llama_backends():
    """Two real OpenAI-compatible backends (llama-cpp-python's server on SmolLM2-135M, one thread each).

    Yields ``{"small": base_url, "large": base_url}``; each serves the model under its alias.
    Both run the same GGUF: the tests check plumbing (routing, streaming, fallback), not quality.
    """
    yield from _small_and_large()


@pytest.fixture(scope="session")
def llama_tool_backends():
    """Two real llama.cpp backends on SmolLM2-135M that emit tool calls (``chatml-function-calling``).

    ``tool_choice="auto"`` lets the model choose between a message and a tool call under a grammar,
    a named ``tool_choice`` forces that tool with schema-constrained arguments; ``"required"`` is not
    implemented by llama-cpp-python (HTTP 500). The arguments are valid JSON for the tool's schema,
    but SmolLM2-135M picks their values poorly (asked for magic_function(3) it sends ``{"input": 10}``):
    tests assert the plumbing, never that the values are right.
    """
    yield from _small_and_large(chat_format="chatml-function-calling")


@pytest.fixture(autouse=True)
def _llama_servers_stay_alive():
    """Fail the test that a llama.cpp backend died in, with the server's own output, instead of
    letting every later test time out on "Connection refused"."""
    yield
    from llama_servers import dead_servers

    dead = dead_servers()
    if dead:
        pytest.fail("a llama.cpp backend died during this test:\n" + "\n\n".join(dead), pytrace=False)


@pytest.fixture
def recorder():
    """LlamaIndex's root dispatcher events during one test (tests/llamaindex_events.py)."""
    from llama_index.core.instrumentation import get_dispatcher
    from llamaindex_events import Recorder

    root = get_dispatcher()
    rec = Recorder(events=[])
    root.add_event_handler(rec)
    yield rec
    root.event_handlers.remove(rec)
