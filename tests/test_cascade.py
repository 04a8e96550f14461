"""Cascade core: P(T) parsing, escalation, replay and calibration, real local generation.

The policy tests feed logged signal arrays (plain data, the same form the benchmark
replays); the generation tests run the real SmolLM2-135M.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difficulty_router import (
    Cascade,
    CascadePolicy,
    CascadeRun,
    LocalGenerator,
    MissingLogprobsError,
    ModelPool,
    PIKProbe,
    answer_confidence,
    openai_token_logprobs,
)
from difficulty_router.calling.cascade_policy import hybrid_start, simulate
from difficulty_router.extraction.numerics import LOGPROB_ATOL

LADDER = ["small", "medium", "large"]


# -- P(T) -------------------------------------------------------------------------------
def test_answer_confidence_reductions_skip_leading_whitespace():
    tokens, lps = [" ", "B", "."], [-0.01, math.log(0.5), math.log(0.25)]
    assert answer_confidence(lps, "first", tokens) == pytest.approx(0.5)
    assert answer_confidence(lps, "min", tokens) == pytest.approx(0.25)
    assert answer_confidence(lps, "mean", tokens) == pytest.approx(math.sqrt(0.5 * 0.25))


@pytest.mark.parametrize("bad, message", [([], "no tokens"), ([0.5], "<= 0"), ([float("nan")], "real numbers")])
def test_answer_confidence_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        answer_confidence(bad)
    with pytest.raises(ValueError, match="unknown reduction"):
        answer_confidence([-1.0], "median")


def test_openai_logprobs_parsed_from_dicts_and_missing_is_a_clear_error():
    completion = {"choices": [{"message": {"content": "B"}, "finish_reason": "stop",
                               "logprobs": {"content": [{"token": "B", "logprob": -0.2, "top_logprobs": []}]}}]}
    assert openai_token_logprobs(completion) == (["B"], [-0.2])
    assert openai_token_logprobs(completion["choices"][0]["logprobs"]) == (["B"], [-0.2])  # LangChain's metadata form
    with pytest.raises(MissingLogprobsError, match="logprobs=True"):
        openai_token_logprobs({"choices": [{"message": {"content": "B"}, "finish_reason": "stop", "logprobs": None}]})
    with pytest.raises(MissingLogprobsError, match="no choices"):
        openai_token_logprobs({"choices": []})


# -- the policy ----------------------------------------------------------------------------
def test_policy_validates_its_configuration():
    with pytest.raises(ValueError, match="2 or more"):
        CascadePolicy(["only"])
    with pytest.raises(ValueError, match="twice"):
        CascadePolicy(["a", "a"])
    with pytest.raises(ValueError, match="subset"):
        CascadePolicy(LADDER, signals=("logits",))
    with pytest.raises(ValueError, match="not below the top"):
        CascadePolicy(LADDER, pt_threshold={"large": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CascadePolicy(LADDER, pt_threshold=1.5)
    with pytest.raises(ValueError, match="needs the 'pik' signal"):
        CascadePolicy(LADDER, on_missing_logprobs="pik_only")
    with pytest.raises(ValueError, match="needs both signals"):
        CascadePolicy(LADDER, combine="learned")


def test_run_escalates_in_ladder_order_and_records_every_attempt():
    policy = CascadePolicy(LADDER, signals=("pt", "pik"), pt_threshold=0.6, pik_threshold={"small": 0.5, "medium": 0.3})
    run = CascadeRun(policy, cost_fn=lambda m, p, c: {"small": 1, "medium": 3, "large": 10}[m] * (p + c))
    assert run.next_model == "small"
    first = run.record("small", "A", logprobs=[math.log(0.9)], pik=0.2, prompt_tokens=9, completion_tokens=1)
    assert not first.accepted and "P(IK) 0.200 < 0.5" in first.reason  # either signal low -> escalate
    with pytest.raises(ValueError, match="expected an answer from 'medium'"):
        run.record("large", "C", logprobs=[-0.1])
    second = run.record("medium", "B", logprobs=[math.log(0.4)], pik=0.9, prompt_tokens=9, completion_tokens=1)
    assert not second.accepted and "P(T) 0.400 < 0.6" in second.reason
    top = run.record("large", "C", logprobs=[math.log(0.01)], pik=0.0, prompt_tokens=9, completion_tokens=1)
    assert top.accepted and top.reason == "top of the ladder"
    result = run.result()
    assert (result.model, result.text, result.escalations) == ("large", "C", 2)
    assert result.cost == pytest.approx(10 * (1 + 3 + 10))  # failed attempts are paid for
    assert [a["model"] for a in result.to_dict()["attempts"]] == LADDER


def test_confident_first_rung_is_accepted_and_failures_escalate():
    policy = CascadePolicy(LADDER, pt_threshold=0.5)
    run = CascadeRun(policy)
    run.record_failure("small", TimeoutError("backend timed out"))
    assert run.next_model == "medium" and run.attempts[0].error == "backend timed out"
    run.record("medium", "B", logprobs=[math.log(0.7)])
    assert run.done and run.result().model == "medium"
    top = CascadeRun(policy, start="large")
    with pytest.raises(TimeoutError):
        top.record_failure("large", TimeoutError("down"))


def test_missing_logprobs_error_escalate_or_pik_only():
    with pytest.raises(MissingLogprobsError, match="on_missing_logprobs"):
        CascadeRun(CascadePolicy(LADDER)).record("small", "A", logprobs=None)
    run = CascadeRun(CascadePolicy(LADDER, on_missing_logprobs="escalate"))
    assert not run.record("small", "A").accepted and run.next_model == "medium"
    run = CascadeRun(CascadePolicy(LADDER, signals=("pt", "pik"), on_missing_logprobs="pik_only", pik_threshold=0.5))
    assert run.record("small", "A", pik=0.8).accepted


def test_hybrid_start_skips_rungs_the_router_expects_to_fail():
    policy = CascadePolicy(LADDER)
    assert hybrid_start(policy, {"small": 0.1, "medium": 0.7, "large": 0.9}, 0.5) == "medium"
    assert hybrid_start(policy, {"small": 0.1, "medium": 0.2, "large": 0.3}, 0.5) == "large"
    with pytest.raises(ValueError, match="pool must include the ladder"):
        hybrid_start(policy, {"small": 0.1}, 0.5)


# -- replay and calibration ------------------------------------------------------------------
def test_simulate_counts_every_attempt_from_the_start_rung():
    accept = np.array([[True, False, False], [False, False, False], [False, True, False]])
    correct = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=float)
    cost = np.tile([1.0, 3.0, 10.0], (3, 1))
    out = simulate(accept, correct, cost)
    assert out["chosen"].tolist() == [0, 2, 1]
    assert out["cost"] == pytest.approx((1 + 14 + 4) / 3)
    assert out["accuracy"] == pytest.approx(1.0)
    started = simulate(accept, correct, cost, start=np.array([1, 1, 2]))
    assert started["chosen"].tolist() == [2, 2, 2] and started["cost"] == pytest.approx((13 + 13 + 10) / 3)


def _signals(n=400, seed=0):
    """Logged signals where P(T) carries real information about each rung's correctness."""
    rng = np.random.default_rng(seed)
    skill = np.array([0.3, 0.55, 0.8])
    correct = (rng.random((n, 3)) < skill).astype(float)
    pt = np.clip(0.25 + 0.5 * correct + rng.normal(0, 0.2, (n, 3)), 0.01, 1.0)
    pik = np.clip(0.3 + 0.3 * correct + rng.normal(0, 0.25, (n, 3)), 0.01, 0.99)
    cost = np.tile([1.0, 4.0, 16.0], (n, 1))
    return correct, cost, pt, pik


def test_calibrate_to_a_cost_budget_and_to_an_accuracy_target():
    correct, cost, pt, pik = _signals()
    policy = CascadePolicy(LADDER)
    point = policy.calibrate(correct, cost, pt=pt, target_cost=8.0)
    replay = simulate(policy.accept_matrix(pt, pik), correct, cost)
    assert replay["cost"] <= 8.0 and replay["accuracy"] == pytest.approx(point["accuracy"])
    assert replay["accuracy"] > correct[:, 1].mean()  # beats the mid model alone at less than its cost x2
    point = policy.calibrate(correct, cost, pt=pt, max_accuracy_drop=0.01)
    replay = simulate(policy.accept_matrix(pt, pik), correct, cost)
    assert replay["accuracy"] >= correct.mean(axis=0).max() - 0.01 - 1e-9
    assert replay["cost"] < 16.0  # cheaper than always calling the top model
    with pytest.raises(ValueError, match="no operating point"):
        policy.calibrate(correct, cost, pt=pt, target_cost=0.5)
    with pytest.raises(ValueError, match=r"\(n_rows, 3\)"):
        policy.calibrate(correct[:, :2], cost, pt=pt, target_cost=8.0)


def test_learned_combiner_and_round_trip():
    correct, cost, pt, pik = _signals()
    policy = CascadePolicy(LADDER, signals=("pt", "pik"), combine="learned").fit_combiner(pt, pik, correct)
    assert set(policy.combiners) == {"small", "medium"} and policy.combiners["small"][0] > 0
    policy.calibrate(correct, cost, pt=pt, pik=pik, target_cost=8.0)
    again = CascadePolicy.from_dict(policy.to_dict())
    assert again.to_dict() == policy.to_dict()
    assert np.array_equal(again.accept_matrix(pt, pik), policy.accept_matrix(pt, pik))
    with pytest.raises(ValueError, match="unknown keys"):
        CascadePolicy.from_dict({**policy.to_dict(), "exec": "rm -rf"})


# -- real local generation ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pik_probe(extractor):
    questions = [f"What is {a} times {a + 3}? Reply with the number only." for a in range(30)]
    correct = [float(a % 3 == 0) for a in range(30)]
    return PIKProbe.fit(extractor, questions, correct, layers=15, cv=3, progress=False)


def teacher_forced_logprobs(extractor, query, answer: str) -> tuple[list[int], np.ndarray]:
    """The answer's token ids and their log-probabilities under one full forward pass of the local
    model over the chat-templated query followed by the answer."""
    prompt_ids, _ = extractor.tokenize([query])
    answer_ids = extractor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    full = torch.tensor([prompt_ids[0] + answer_ids])
    with torch.inference_mode():
        logits = extractor.model(full).logits[0].float()
    start = len(prompt_ids[0])
    return answer_ids, torch.log_softmax(logits[start - 1 : -1], -1).gather(1, full[0, start:, None])[:, 0].numpy()


def test_local_generation_logprobs_match_a_full_forward_pass(any_dtype_extractor, pik_probe):
    extractor = any_dtype_extractor
    generator = LocalGenerator(extractor, name="small", pik_probe=pik_probe, max_new_tokens=6)
    query = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    out = generator.generate(query)
    assert out.text and len(out.logprobs) == len(out.tokens) and all(lp <= 0 for lp in out.logprobs)
    _, expected = teacher_forced_logprobs(extractor, query, out.text)
    atol = LOGPROB_ATOL[extractor.dtype]
    assert np.abs(np.array(out.logprobs) - expected).max() <= atol
    # P(IK) from the generation's own prefill equals the probe on the extractor's read-out
    assert out.pik == pytest.approx(float(pik_probe.score(extractor, [query])[0]), abs=1e-4)


def test_pik_probe_round_trip_refuses_another_models_activations(tmp_path, extractor, pik_probe):
    pik_probe.save(tmp_path / "pik")
    loaded = PIKProbe.load(tmp_path / "pik")
    assert np.allclose(loaded.score(extractor, ["Name a prime number."]), pik_probe.score(extractor, ["Name a prime number."]))
    loaded.model_hash = "0" * 64
    with pytest.raises(ValueError, match="another model"):
        loaded.score(extractor, ["x"])
    with pytest.raises(FileNotFoundError, match="pik.json"):
        PIKProbe.load(tmp_path)


def test_cascade_runs_real_rungs_and_prices_attempts(extractor, pik_probe):
    small = LocalGenerator(extractor, name="small", pik_probe=pik_probe, max_new_tokens=4)
    large = LocalGenerator(extractor, name="large", max_new_tokens=4)
    pool = ModelPool.from_dict({"models": [{"name": "small", "input_cost_per_1m": 1.0, "output_cost_per_1m": 2.0},
                                           {"name": "large", "cost_per_query": 0.5}]})
    eager = Cascade([small, large], CascadePolicy(["small", "large"], pt_threshold=0.0), pool=pool)
    result = eager.run("Say hello.")
    assert result.model == "small" and result.escalations == 0
    first = result.attempts[0]
    assert 0 < first.pt <= 1 and first.cost == pytest.approx((first.prompt_tokens + 2 * first.completion_tokens) / 1e6)
    strict = Cascade([small, large], CascadePolicy(["small", "large"], pt_threshold=1.0), pool=pool).run("Say hello.")
    assert [a.model for a in strict.attempts] == ["small", "large"] and strict.cost == pytest.approx(first.cost + 0.5)
    with pytest.raises(ValueError, match="no generator for ladder rungs"):
        Cascade([small], CascadePolicy(["small", "large"]))


def test_a_routed_call_keeps_the_routing_prefill_for_itself_only(extractor, trained_router):
    """A local rung on the router's own model starts from the routing read-out's keys and values, within
    the one routed call that made them; afterwards the extractor holds none (a server would otherwise
    keep the last query's), whether the rung used them or the call went elsewhere."""
    assert extractor._lean is not None  # the path that can keep a read-out's keys and values
    small, large = trained_router.models[:2]
    local = LocalGenerator(extractor, name=small, max_new_tokens=3)
    other = LocalGenerator(extractor, name=large, max_new_tokens=3, reuse_routing_prefill=False)
    query = "What is 2 + 2? Reply with the number only."
    trained_router.route(query)  # routing alone, as a server does for every request: nothing is kept
    assert not extractor.holds_prefill
    policy = CascadePolicy([small, large], pt_threshold=0.0)
    served_here = Cascade([local, other], policy, router=trained_router, skip_threshold=0.0).run(query)
    assert served_here.model == small and local.reused_prefill
    assert not extractor.holds_prefill
    skipped = Cascade([local, other], policy, router=trained_router, skip_threshold=1.0).run(query)
    assert skipped.model == large and [a.model for a in skipped.attempts] == [large]
    assert not extractor.holds_prefill  # read for routing, not used by the rung that served: dropped


# -- a real OpenAI-compatible endpoint (llama-cpp-python's server on loopback) -----------------
def test_openai_endpoint_logprobs_drive_the_cascade(llama_backends, extractor):
    from openai import OpenAI

    from difficulty_router import OpenAIGenerator

    llama_endpoint = llama_backends["small"]  # the session's server on SmolLM2, serving it as "small"

    remote = OpenAIGenerator("small", name="remote", base_url=llama_endpoint, max_new_tokens=5)
    out = remote.generate("Name one colour.")
    assert out.text and out.logprobs and len(out.tokens) == len(out.logprobs) and out.completion_tokens > 0
    assert all(lp <= 0 for lp in out.logprobs)
    # the endpoint's logprobs are the model's own: the same weights run locally (dequantised, teacher-forced on
    # the endpoint's answer) give the same tokens and log-probabilities up to llama.cpp's quantised arithmetic
    # (measured: at most 0.23 nats per token, P(T) within 0.03)
    answer_ids, local = teacher_forced_logprobs(extractor, "Name one colour.", out.text)
    assert [extractor.tokenizer.decode([t]) for t in answer_ids] == out.tokens
    assert np.abs(np.array(out.logprobs) - local).max() < 0.5
    assert answer_confidence(out.logprobs, "mean", out.tokens) == pytest.approx(
        answer_confidence(list(local), "mean", out.tokens), abs=0.1)

    # asked without logprobs, the endpoint sends none: a clear error, or escalation as configured
    client = OpenAI(base_url=llama_endpoint, api_key="unused")
    bare = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    with pytest.raises(MissingLogprobsError):
        openai_token_logprobs(bare)

    class NoLogprobs:  # the same real endpoint, called the way a client that cannot ask for logprobs would
        name = "remote"

        def generate(self, query, max_new_tokens=None):
            reply = client.chat.completions.create(model="small", messages=[{"role": "user", "content": query}],
                                                   max_tokens=3)
            from difficulty_router.calling.generation import Generation

            return Generation(reply.choices[0].message.content or "", None, None, 0, 0)

    local = LocalGenerator(extractor, name="local", max_new_tokens=3)
    with pytest.raises(MissingLogprobsError, match="no logprobs"):
        Cascade([NoLogprobs(), local], CascadePolicy(["remote", "local"])).run("Hi")
    escalated = Cascade([NoLogprobs(), local], CascadePolicy(["remote", "local"], on_missing_logprobs="escalate")).run("Hi")
    assert [a.model for a in escalated.attempts] == ["remote", "local"]
    assert escalated.attempts[0].reason == "no logprobs: escalating"
