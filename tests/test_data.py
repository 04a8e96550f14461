"""Outcomes files, converters and pool files: bad input is named with its line."""

import gzip
import json

import numpy as np
import pytest

from difficulty_router import ModelPool, load_llmrouter, load_mmlu_pro, load_outcomes, save_outcomes
from difficulty_router.data.outcomes import mmlu_pro_prompt


def write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"prompt": "2+2?", "correct": {"a": True, "b": 1}}


def test_loads_prompts_messages_scores_and_costs(tmp_path):
    path = write_lines(tmp_path / "o.jsonl", [
        {"id": "q1", "prompt": "2+2?", "correct": {"a": True, "b": False}, "difficulty": 1, "cost": {"a": 0.1}},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "scores": {"a": 0.25, "b": 1}},
    ])
    o = load_outcomes(path)
    assert o.models == ["a", "b"] and o.ids == ["q1", "2"]
    assert o.scores.tolist() == [[1.0, 0.0], [0.25, 1.0]]
    assert o.difficulty.tolist() == [1, 0]
    assert o.cost[0, 0] == 0.1 and np.isnan(o.cost[0, 1]) and np.isnan(o.cost[1]).all()
    assert o.queries[1][0] == {"role": "system", "content": "s"}


def test_round_trip(tmp_path):
    path = write_lines(tmp_path / "o.jsonl", [GOOD, {"prompt": "x", "correct": {"a": 0, "b": 1}, "difficulty": 4}])
    o = load_outcomes(path)
    save_outcomes(o, tmp_path / "again.jsonl.gz")
    again = load_outcomes(tmp_path / "again.jsonl.gz")
    assert again.scores.tolist() == o.scores.tolist() and again.queries == o.queries
    assert again.difficulty.tolist() == [0, 4]


@pytest.mark.parametrize("rows, message", [
    ([GOOD, {"correct": {"a": 1, "b": 0}}], "line 2: missing 'prompt'"),
    ([GOOD, {"prompt": "x"}], "line 2: missing 'correct'"),
    ([GOOD, {"prompt": "x", "correct": {"a": 1, "c": 0}}], "line 2: .*unknown here: \\['c'\\]"),
    ([GOOD, {"prompt": "x", "correct": {"a": 1}}], "line 2: .*missing here: \\['b'\\]"),
    ([GOOD, '{"prompt": "x", "scores": {"a": NaN, "b": 1}}'], "line 2: scores\\['a'\\] is NaN"),
    ([GOOD, {"prompt": "x", "scores": {"a": 1.5, "b": 1}}], "line 2: .*outside \\[0, 1\\]"),
    ([GOOD, {"prompt": "", "correct": {"a": 1, "b": 0}}], "line 2: query is an empty string"),
    ([GOOD, {"prompt": "x", "correct": {"a": "yes", "b": 0}}], "line 2: .*must be a bool or a number"),
    ([GOOD, {"prompt": "x", "correct": {"a": 1, "b": 0}, "difficulty": 9}], "line 2: difficulty must be"),
    ([GOOD, {"prompt": "x", "correct": {"a": 1, "b": 0}, "cost": {"z": 1}}], "line 2: 'cost' names unknown"),
    ([GOOD, "{not json"], "line 2: not valid JSON"),
])
def test_bad_rows_are_named(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_outcomes(write_lines(tmp_path / "bad.jsonl", rows))


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no rows"):
        load_outcomes(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="outcomes file not found"):
        load_outcomes(tmp_path / "nope.jsonl")


def test_split_is_seeded_and_disjoint(sample_outcomes):
    a, b = sample_outcomes.split(0.25, seed=3)
    a2, _ = sample_outcomes.split(0.25, seed=3)
    assert a.ids == a2.ids and len(a) == 750 and not set(a.ids) & set(b.ids)


def test_pool_files(tmp_path):
    (tmp_path / "pool.yaml").write_text(
        "models:\n  - {name: small, cost_per_query: 0.0001}\n"
        "  - {name: large, input_cost_per_1m: 10.0, output_cost_per_1m: 30.0, expected_output_tokens: 300}\n")
    pool = ModelPool.load(tmp_path / "pool.yaml")
    costs = pool.costs([400])[0]
    assert costs[0] == 0.0001
    assert costs[1] == pytest.approx(100 * 10 / 1e6 + 300 * 30 / 1e6)
    with pytest.raises(ValueError, match="absent from"):
        pool.check_against(["small", "medium"])


@pytest.mark.parametrize("pool, message", [
    ({"models": [{"name": "a"}, {"name": "b", "cost_per_query": 1}]}, "'a' has no cost"),
    ({"models": [{"name": "a", "cost_per_query": 1}]}, "at least two models"),
    ({"models": [{"name": "a", "cost_per_query": -1}, {"name": "b", "cost_per_query": 1}]}, "non-negative"),
    ({"models": [{"name": "a", "cost_per_query": 1}, {"name": "a", "cost_per_query": 2}]}, "more than once"),
    ({"models": [{"name": "a", "input_cost_per_1m": 1}, {"name": "b", "cost_per_query": 1}]}, "needs both"),
    ({"models": [{"name": "a", "cost_per_query": 1, "colour": "red"}, {"name": "b", "cost_per_query": 1}]}, "unknown keys"),
    ({"model": []}, "'models' list"),
])
def test_bad_pools(tmp_path, pool, message):
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    with pytest.raises(ValueError, match=message):
        ModelPool.load(tmp_path / "pool.json")


def test_mmlu_pro_converter(tmp_path):
    """A three-question export in the MMLU-Pro layout; rows with a missing record are dropped."""
    questions = [{"question_id": i, "question": f"Q{i}?", "options": ["x", "y"], "answer": "A", "category": "law"}
                 for i in (1, 2, 3)]
    with gzip.open(tmp_path / "questions.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(q) for q in questions))
    with gzip.open(tmp_path / "correct.csv.gz", "wt") as fh:
        fh.write("question_id,m1,m2\n1,1,0\n2,,1\n3,0,1\n")
    o = load_mmlu_pro(tmp_path)
    assert o.ids == ["1", "3"] and o.models == ["m1", "m2"]
    assert o.queries[0][0]["content"] == mmlu_pro_prompt("Q1?", ["x", "y"]) == "Q1?\nA. x\nB. y\nAnswer:"
    assert o.scores.tolist() == [[1, 0], [0, 1]]
    assert load_mmlu_pro(tmp_path, models=["m2"]).ids == ["1", "2", "3"]
    with pytest.raises(ValueError, match="not in"):
        load_mmlu_pro(tmp_path, models=["m9"])


def test_llmrouter_converter(tmp_path):
    with gzip.open(tmp_path / "test.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"question": "q?", "scores": {"a": 0.5, "b": 1.0}, "cluster_id": 3}) + "\n")
    o = load_llmrouter(tmp_path / "test.jsonl.gz")
    assert o.scores.tolist() == [[0.5, 1.0]] and o.queries[0][0]["content"] == "q?"
