"""Small builders several test modules share: label prompt files and pool files, the routing server's
backend specs and client, a trained router under another policy. Fixtures live in conftest.py; these are
plain functions a test or a fixture calls."""

from __future__ import annotations

import json

from conftest import STRONG, WEAK

from difficulty_router import DifficultyRouter, Policy

# -- labelling (test_labelling, test_ray_label) --------------------------------------------------------------
#: short arithmetic prompts with their reference answers: a number grader checks SmolLM2's replies
PROMPTS = [
    ("What is 2 + 2? Reply with the number only.", "4"),
    ("What is 3 + 5? Reply with the number only.", "8"),
    ("What is 10 - 7? Reply with the number only.", "3"),
    ("How many legs does a cat have? Reply with the number only.", "4"),
    ("What is 6 times 2? Reply with the number only.", "12"),
]
#: the first pool model of every label test: told to answer in a word, greedy, 8 tokens
TERSE_GENERATION = {"system": "Answer in one word.", "temperature": 0.0, "max_tokens": 8}


def write_prompts(path, n, reference=True):
    """A prompt file of the first ``n`` :data:`PROMPTS` (ids q0, q1, ...), with their references unless not."""
    with open(path, "w") as fh:
        for i, (prompt, answer) in enumerate(PROMPTS[:n]):
            row = {"id": f"q{i}", "prompt": prompt}
            if reference:
                row["reference"] = answer
            fh.write(json.dumps(row) + "\n")
    return path


def write_label_pool(path, backends, second: str, second_generation: dict, *, judge=False, cost_per_query=0.001):
    """A pool file for ``label``: "terse" on the "small" backend and ``second`` (twice the price, with its
    ``second_generation`` settings) on "large"; with ``judge``, the "large" backend judges too, for free."""
    pool = {
        "models": [
            {"name": "terse", "base_url": backends["small"], "model": "small", "cost_per_query": cost_per_query},
            {"name": second, "base_url": backends["large"], "model": "large", "cost_per_query": 2 * cost_per_query},
        ],
        "label": {"generation": {"terse": dict(TERSE_GENERATION), second: dict(second_generation)}},
    }
    if judge:
        pool["label"]["judge"] = {"name": "judge", "base_url": backends["large"], "model": "large", "cost_per_query": 0.0}
    path.write_text(json.dumps(pool))
    return path


# -- the routing server (test_server, test_ray_scale) --------------------------------------------------------
def backend_specs(llama_backends, weak_url=None, strong_url=None):
    """The sample pool's two models served by the llama.cpp backends ("small" and "large"), or by the given URLs."""
    from difficulty_router.server import BackendSpec

    return [
        BackendSpec(WEAK, weak_url or llama_backends["small"], "small", timeout=60),
        BackendSpec(STRONG, strong_url or llama_backends["large"], "large", timeout=60),
    ]


def openai_client(url: str, api_key: str = "unused"):
    """The real openai client pointed at a routing server; no retries, so a failure shows at once."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


# -- routers -------------------------------------------------------------------------------------------------
def router_with_policy(router: DifficultyRouter, policy: Policy) -> DifficultyRouter:
    """A router sharing the trained probes but with its own policy, so the session fixture stays untouched."""
    return DifficultyRouter(
        router.extractor,
        router.pool,
        router.probe,
        layers=router.layers,
        pooling=router.pooling,
        capability=router.capability,
        policy=policy,
        difficulty_probe=router.difficulty_probe,
    )
