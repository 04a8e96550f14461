"""The console script, run in-process through its main() on real files."""

import copy
import json

import numpy as np
import pytest
from conftest import STRONG, WEAK
from test_router import HARD

from difficulty_router import DifficultyRouter, Policy
from difficulty_router.cli.main import main
from difficulty_router.data.outcomes import save_outcomes


@pytest.fixture(scope="module")
def saved_router(trained_router, tmp_path_factory):
    return trained_router.save(tmp_path_factory.mktemp("router") / "r")


def test_extract(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('"What is 2+2?"\n{"prompt": "Name a planet."}\n'
                                      '{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["extract", "--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "f.npz"),
                 "--layers", "0.5", "-1", "--pooling", "both"]) == 0
    data = np.load(tmp_path / "f.npz", allow_pickle=False)
    assert data["features"].shape == (3, 4 * 576)
    assert data["layers"].tolist() == [15, 30] and data["pooling"].tolist() == ["last", "mean"]
    assert "3 queries -> features (3, 2304)" in capsys.readouterr().out


def test_extract_reports_bad_input(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('"fine"\n{"text": "no known key"}\n')
    assert main(["extract", "--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "f.npz")]) == 2
    assert "line 2: object has none of" in capsys.readouterr().err
    assert main(["extract", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "f.npz")]) == 2
    assert "input file not found" in capsys.readouterr().err


def test_route(trained_router, tmp_path, capsys):
    """The CLI prints the library's own decision: ``DifficultyRouter.load(dir).route(query)``, the model and
    the probabilities, for a plain prompt and for --messages. The saved policy is a threshold between an
    easy and a hard query's P(weak right), so the two go to different models and a CLI that printed any
    fixed model, or a model unrelated to the probabilities, would fail."""
    easy, hard = "What is 2+2?", HARD
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    weak = trained_router.models.index(WEAK)
    p_easy, p_hard = trained_router.predict_proba([easy, hard])[:, weak]
    assert p_easy - p_hard > 0.05, (p_easy, p_hard)  # room for a threshold between them
    router = copy.copy(trained_router)
    router.policy = Policy("threshold", float((p_easy + p_hard) / 2))
    saved = router.save(tmp_path / "r")
    library = DifficultyRouter.load(saved)  # what the CLI loads: the extractor the manifest names
    expected = {"easy": library.route(easy), "hard": library.route(hard), "messages": library.route(messages)}
    assert (expected["easy"].model, expected["hard"].model) == (WEAK, STRONG)

    for name, query in (("easy", easy), ("hard", hard)):
        assert main(["route", "--router", str(saved), "--json", query]) == 0
        decision = json.loads(capsys.readouterr().out)
        assert decision["model"] == expected[name].model, name
        assert decision["probabilities"] == pytest.approx(expected[name].probabilities, abs=1e-6), name
        assert decision["difficulty"] == pytest.approx(expected[name].difficulty, abs=1e-5), name
        assert decision["policy"] == "threshold" and decision["parameter_value"] == router.policy.value

    assert main(["route", "--router", str(saved), "--messages", json.dumps(messages)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"-> {expected['messages'].model} (difficulty ")
    for model, p in expected["messages"].probabilities.items():
        assert f"{model}={p:.2f}" in printed
    assert printed == str(expected["messages"])


def test_evaluate_json(saved_router, sample_outcomes, tmp_path, capsys):
    save_outcomes(sample_outcomes.subset(range(300, 400)), tmp_path / "test.jsonl")
    assert main(["evaluate", "--router", str(saved_router), "--data", str(tmp_path / "test.jsonl"), "--json",
                 "--no-feature-cache", "--plot", str(tmp_path / "eval.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 100
    for key in ("auc", "apgr", "cpt50", "cpt80", "best_model", "best_model_accuracy", "best_model_cost",
                "cost_to_match_best", "oracle_gap_closed", "curve", "baselines"):
        assert key in report
    assert set(report["baselines"]["tfidf"]) >= {"auc", "apgr", "cpt50", "cpt80"}
    assert all({"lambda", "accuracy", "cost"} <= set(p) for p in report["curve"])
    assert (tmp_path / "eval.png").stat().st_size > 10_000


def test_train_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "pool.json").write_text(json.dumps({"models": [{"name": "x", "cost_per_query": 1},
                                                                {"name": "y", "cost_per_query": 2}]}))
    (tmp_path / "o.jsonl").write_text(json.dumps({"prompt": "q", "correct": {"x": 1, "z": 0}}) + "\n")
    assert main(["train", "--data", str(tmp_path / "o.jsonl"), "--pool", str(tmp_path / "pool.json"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "pool models ['y'] are absent" in capsys.readouterr().err


def test_convert(tmp_path, capsys):
    import gzip

    with gzip.open(tmp_path / "split.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"question": "q?", "scores": {"a": 0.5, "b": 1.0}}) + "\n")
    assert main(["convert", "llmrouter", str(tmp_path / "split.jsonl.gz"), str(tmp_path / "out.jsonl")]) == 0
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["prompt"] == "q?" and row["scores"] == {"a": 0.5, "b": 1.0}
