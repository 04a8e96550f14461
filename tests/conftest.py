"""Shared fixtures: the real embedded extractor (SmolLM2-135M) and a router trained on the shipped sample.

Numeric paths (issue 28). The same test must pass on every CPU kind, and ``dtype="auto"`` picks bf16 on
some and float32 on others, so no test here runs on "auto":

* every test runs on one *pinned* path, float32, on every machine: ``DIFFICULTY_ROUTER_DTYPE`` is set
  before any extractor, CLI subprocess or server is built, so what a test sees does not depend on the CPU;
* a test whose expectation depends on the numeric path takes the ``numeric_path`` fixture (or
  ``any_dtype_extractor``, which takes it) and runs once per path, float32 and bfloat16, on every machine
  (bf16 is emulated where the CPU has no native bf16), with the tolerance that path promises
  (``difficulty_router.extraction.numerics.FEATURE_RTOL`` and friends);
* ``DIFFICULTY_ROUTER_DTYPE=bfloat16 pytest ...`` (or ``float32``) forces one path for everything:
  pinned tests and numeric tests alike run only that path.

Both fixtures are session-scoped: the model loads once per path (under a second after the first GGUF
dequantisation) and the router trains once on 240 real RouteLLM MMLU rows.
"""

from __future__ import annotations

import os

import pytest
import torch

from difficulty_router import ActivationExtractor, ModelPool, load_outcomes, train_router
from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE
from difficulty_router.extraction.numerics import DTYPE_ENV, PROBA_ATOL, dtype_name, pick_dtype

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"

_FORCED = os.environ.get(DTYPE_ENV, "").strip().lower()
if _FORCED in ("", "auto"):
    #: the path every test runs on unless it asks for ``numeric_path``
    PINNED_PATH = "float32"
    #: the paths a numeric test runs on
    NUMERIC_PATHS: tuple[str, ...] = ("float32", "bfloat16")
else:
    # the library's own reading of the variable: its aliases, and its error for a value that is no dtype
    PINNED_PATH = dtype_name(pick_dtype("auto", torch.device("cpu")))
    NUMERIC_PATHS = (PINNED_PATH,)
# set at import, before any fixture: extractors built on "auto" inside tests, the CLI's and the servers'
# subprocesses all take the pinned path
os.environ[DTYPE_ENV] = PINNED_PATH


def proba_atol(router) -> float:
    """The tolerance for comparing one query's probabilities routed alone and in a batch."""
    return PROBA_ATOL[router.extractor.dtype]


@pytest.fixture(params=NUMERIC_PATHS)
def numeric_path(request, monkeypatch) -> str:
    """The numeric path a dtype-sensitive test runs on: each of float32 and bfloat16 in turn (one, when
    forced). Extractors built on "auto" during the test, and subprocesses it starts, take this path too."""
    monkeypatch.setenv(DTYPE_ENV, request.param)
    return request.param


class _ExtractorsByPath(dict):
    """One extractor per numeric path, built on first use (the bf16 one only where a test needs it)."""

    def __missing__(self, name: str) -> ActivationExtractor:
        self[name] = ActivationExtractor("smollm2-135m", layers=15, pooling="last", dtype=name)
        return self[name]


@pytest.fixture(scope="session")
def extractors_by_dtype() -> dict[str, ActivationExtractor]:
    """One extractor per numeric path, whatever this CPU picks for "auto": bf16 runs everywhere
    (emulated where the CPU has no native bf16), so both paths are tested on every machine."""
    return _ExtractorsByPath()


@pytest.fixture(scope="session")
def extractor(extractors_by_dtype) -> ActivationExtractor:
    """The extractor on the pinned path (float32 unless $DIFFICULTY_ROUTER_DTYPE forces one)."""
    return extractors_by_dtype[PINNED_PATH]


@pytest.fixture
def any_dtype_extractor(numeric_path, extractors_by_dtype) -> ActivationExtractor:
    """The extractor on each numeric path in turn."""
    return extractors_by_dtype[numeric_path]


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


def _small_and_large(chat_format: str | None = None, large_template: str | None = None):
    """Yields ``{"small": base_url, "large": base_url}``: two llama.cpp servers on the embedded GGUF,
    both on ``chat_format`` (None: the GGUF's own template), or "large" on ``large_template``."""
    from contextlib import ExitStack

    from llama_servers import llama_server, smollm2_gguf

    gguf = smollm2_gguf()
    with ExitStack() as stack:
        yield {"small": stack.enter_context(llama_server(gguf, "small", chat_format=chat_format)),
               "large": stack.enter_context(llama_server(gguf, "large", chat_format=chat_format,
                                                         chat_template=large_template))}


@pytest.fixture(scope="session")
def llama_backends():
    """Two real OpenAI-compatible backends (llama-cpp-python's server on SmolLM2-135M, one thread each).

    Yields ``{"small": base_url, "large": base_url}``; each serves the model under its alias.
    Both run the same GGUF: the tests check plumbing (routing, streaming, fallback), not quality.
    They differ in their chat template, so they give different greedy answers and a test can tell
    which one served a reply by its content: "small" uses the GGUF's own, "large"
    ``llama_servers.FRENCH_CHATML`` (the same ChatML, told to reply in French). Whether a given
    request's answers differ is checked, not assumed: ``llama_servers.direct_answers``.
    """
    from llama_servers import FRENCH_CHATML

    yield from _small_and_large(large_template=FRENCH_CHATML)


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


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster for the module: 2 CPUs on loopback, no dashboard, no usage stats."""
    import ray  # the dev install includes the ray extra: a missing ray is an import error, not a skip

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


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
