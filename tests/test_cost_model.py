"""The output-length head on real MMLU-Pro answer lengths, expected-dollar decisions, the bundle round trip,
and ``difficulty-router report`` on a real decision log."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from difficulty_router import DifficultyRouter, ModelPool, PoolModel, load_mmlu_pro
from difficulty_router.calling.dispatch import Binding, Reply, run_sync
from difficulty_router.cli.main import main as cli_main
from difficulty_router.datasets import MMLU_PRO_SAMPLE
from difficulty_router.learning.length_head import OutputLengthHead, output_tokens_from_chars
from difficulty_router.routing.decision_log import DecisionLog

LONG, SHORT = "gemini-1.5-flash-002", "gemini-1.5-pro-002"  # median answers 337 and 119 characters in the sample
# USD per million input and output tokens, as the pool below prices them (written out here, not read back from the pool)
PRICES = {"weak": (0.6, 0.6), "strong": (10.0, 30.0)}


@pytest.fixture(scope="module")
def mmlu_pro_lengths(trained_router):
    """The 160 MMLU-Pro questions shipped in difficulty_router.datasets (see its README.md), with both
    Gemini models' recorded answer lengths in tokens."""
    outcomes = load_mmlu_pro(MMLU_PRO_SAMPLE, models=[LONG, SHORT])
    assert len(outcomes) == 160
    tokens = output_tokens_from_chars(outcomes.extra["output_chars"])
    assert np.isfinite(tokens).all()  # the sample was drawn from rows where both models have a length
    return outcomes.queries, trained_router.features(outcomes.queries).features, tokens


def test_the_head_learns_each_models_length_better_than_a_constant(mmlu_pro_lengths):
    _, X, tokens = mmlu_pro_lengths
    train, test = slice(0, 110), slice(110, None)
    head = OutputLengthHead().fit(X[train], tokens[train])
    pred = head.predict_log(X[test])
    # the two models' lengths differ and the head keeps them apart
    assert np.median(head.predict_tokens(X[test])[:, 0]) > 1.5 * np.median(head.predict_tokens(X[test])[:, 1])
    # no worse than each model's mean log length on held-out rows (a constant per model)
    constant = np.log(tokens[train]).mean(axis=0)
    assert np.abs(pred - np.log(tokens[test])).mean() <= np.abs(constant - np.log(tokens[test])).mean() + 0.05
    # smearing: the mean predicted tokens on the training rows match the recorded mean
    assert head.predict_tokens(X[train]).mean(axis=0) == pytest.approx(tokens[train].mean(axis=0), rel=0.35)
    with pytest.raises(ValueError, match="recorded lengths"):
        OutputLengthHead().fit(X[:20], np.full((20, 2), np.nan))


def token_priced_router(trained_router, head):
    router = copy.copy(trained_router)
    weak, strong = trained_router.models
    (weak_in, weak_out), (strong_in, strong_out) = PRICES["weak"], PRICES["strong"]
    router.pool = ModelPool((PoolModel(name=weak, input_cost_per_1m=weak_in, output_cost_per_1m=weak_out),
                             PoolModel(name=strong, input_cost_per_1m=strong_in, output_cost_per_1m=strong_out,
                                       cached_input_cost_per_1m=2.5)))
    router.length_head = head
    return router


def test_decisions_price_each_model_with_its_predicted_output_length(trained_router, mmlu_pro_lengths, tmp_path):
    queries, X, tokens = mmlu_pro_lengths
    head = OutputLengthHead().fit(X, tokens)
    router = token_priced_router(trained_router, head)
    query = queries[0]
    decision = router.route(query)
    # the head's prediction for this query alone, column j = router.models[j] (LONG for weak, SHORT for strong)
    predicted = head.predict_tokens(trained_router.features([query]).features)[0]
    assert predicted[0] > predicted[1] > 0
    assert decision.output_tokens == pytest.approx(dict(zip(router.models, predicted, strict=True)))
    # expected dollars written out: prompt at 4 characters a token ("user: " + the question, as routed)
    # times the input price, plus each model's own predicted output tokens times its output price
    (message,) = query
    prompt_tokens = len("user: " + message["content"]) / 4
    for m, price, out_tokens in zip(router.models, (PRICES["weak"], PRICES["strong"]), predicted, strict=True):
        expected = (prompt_tokens * price[0] + out_tokens * price[1]) / 1e6
        assert decision.costs[m] == pytest.approx(expected, rel=1e-6)
    constant = copy.copy(router)
    constant.length_head = None
    assert constant.route(queries[0]).costs != pytest.approx(decision.costs)  # the head changed the prices
    # the bundle keeps the head: same predicted lengths after a round trip
    router.save(tmp_path / "bundle")
    loaded = DifficultyRouter.load(tmp_path / "bundle", extractor=router.extractor)
    assert loaded.length_head is not None
    assert loaded.route(queries[0]).output_tokens == pytest.approx(decision.output_tokens)


def test_report_summarises_a_real_shadow_log(trained_router, tmp_path, capsys):
    default = trained_router.capability_order()[-1]
    log_path = tmp_path / "shadow.jsonl"
    binding = Binding(trained_router.models, router=trained_router, shadow=default,
                      decision_log=DecisionLog(log_path), rng=random.Random(0))
    queries = ["What is 2 + 2?", "Name the capital of France.", "Prove Fermat's little theorem.",
               "Explain entropy in statistical mechanics.", "What colour is the sky?", "Define a prime number."]
    chosen, routed_cost, served_cost = [], 0.0, 0.0
    for q in queries:
        decision = binding.decide(q)
        run_sync(binding.start(decision, query=q), lambda model: Reply(model, "ok"))
        chosen.append(decision.model)
        routed_cost += decision.costs[decision.model]
        served_cost += decision.costs[default]
    # the router sends some of these to the cheaper model, so the report has a real saving to state
    assert set(chosen) != {default} and 0 < routed_cost < served_cost
    png = tmp_path / "report.png"
    assert cli_main(["report", str(log_path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"{len(queries)} decisions ({len(queries)} in shadow mode)" in out
    for m in set(chosen):
        assert f"{m}  {100 * chosen.count(m) / len(queries):.1f}%" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({len(queries)} priced decisions): saving {100 * (1 - routed_cost / served_cost):.1f}%" in out
