"""The console script, run in-process through its main() on real files."""

import json

import numpy as np
import pytest

from difficulty_router.cli import main
from difficulty_router.data import save_outcomes


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


def test_route(saved_router, capsys):
    assert main(["route", "--router", str(saved_router), "--json", "What is 2+2?"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["model"] in decision["probabilities"]
    assert main(["route", "--router", str(saved_router), "--messages",
                 '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]']) == 0
    assert capsys.readouterr().out.startswith("-> ")


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
