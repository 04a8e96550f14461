"""``difficulty-router label`` end to end against real llama.cpp servers (tests/llama_servers.py).

The pool is two differently configured SmolLM2-135M endpoints (one told to answer in a word
at temperature 0 with 8 tokens, one sampling at temperature 0.7 with 16), the judge is the
second server. SmolLM2 answers and judges poorly: the tests check the labelling machinery
(grading consistency, resume, budget stop, skipped judge rows), never answer quality.
Left free, SmolLM2 seldom replies in the "Score: N" form, so the test that needs every pair
graded constrains the judge's reply with a llama.cpp grammar (the digit is still the model's
own greedy choice) and checks each recorded verdict against the judge asked directly.
Prompts and token limits are kept small so the file runs in well under a minute of calls.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import openai
import pytest
from helpers import PROMPTS, write_label_pool, write_prompts

from difficulty_router import DifficultyRouter, load_outcomes
from difficulty_router.cli.main import main
from difficulty_router.core.pool import PoolModel
from difficulty_router.data.graders import (
    DEFAULT_RUBRIC,
    JudgeParseError,
    extract_choice,
    extract_number,
    get_grader,
    judge_prompt,
    parse_judge_score,
)
from difficulty_router.data.labelling import (
    LabelConfig,
    Labeller,
    config_from_pool_file,
    journal_path,
    langchain_backend,
    openai_backend,
    read_journal,
    read_prompt_rows,
    select_uncertain,
    uncertainty_order,
)
from difficulty_router.data.queries import conversation_text


def write_pool(path, backends, **options):
    """"terse" and "chatty" (sampling at temperature 0.7, 16 tokens); ``judge=True`` adds the judge."""
    return write_label_pool(path, backends, "chatty", {"temperature": 0.7, "max_tokens": 16}, **options)


def labeller(pool_file, **overrides):
    pool, config = config_from_pool_file(pool_file, **overrides)
    return Labeller([openai_backend(m) for m in pool.models], config)


# -- graders (pure functions) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "letter"),
    [("The answer is (C).", "C"), ("B. Paris", "B"), ("(D)", "D"), ("answer: a", "A"), ("I am not sure", None)],
)
def test_choice_extraction(answer, letter):
    assert extract_choice(answer) == letter


def test_reference_graders():
    assert get_grader("number")("So the total is 1,234.0 apples.", "1234")
    assert not get_grader("number")("It is 12", "13")
    assert extract_number("no digits") is None
    assert get_grader("exact")("  Paris. ", "paris")
    assert get_grader("regex")("The capital is Paris", r"\bparis\b")
    assert get_grader("choice")("The answer is (b)", "B")
    with pytest.raises(ValueError, match="reference letter"):
        get_grader("choice")("A", "Paris")
    with pytest.raises(ValueError, match="unknown grader"):
        get_grader("fuzzy")


@pytest.mark.parametrize("reply", ["", "   ", "I think it is good.", "Score: 7", "Score: excellent"])
def test_malformed_judge_replies_raise_a_clear_error(reply):
    with pytest.raises(JudgeParseError, match="judge's reply"):
        parse_judge_score(reply)


@pytest.mark.parametrize(("reply", "score"), [("Score: 4", 4), ("Rating: 2/5", 2), ("5", 5), ("**Score:** 3", 3)])
def test_judge_scores_parse(reply, score):
    assert parse_judge_score(reply) == score


def test_prompt_file_errors_name_the_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="line 2: expected a string or an object"):
        read_prompt_rows(tmp_path / "p.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_rows(tmp_path / "e.jsonl")


# -- end to end on real servers --------------------------------------------------------------------
def test_reference_grading_and_resume(llama_backends, tmp_path):
    pool_file = write_pool(tmp_path / "pool.json", llama_backends)
    out = tmp_path / "labels.jsonl"
    first = labeller(pool_file, grader="number").run(
        read_prompt_rows(write_prompts(tmp_path / "p3.jsonl", 3)), out, progress=False
    )
    assert first.calls == 6 and first.rows_written == 3 and first.stopped is None
    # the training file is what `difficulty-router train` reads, graded consistently with the answers
    outcomes = load_outcomes(out)
    assert outcomes.models == ["terse", "chatty"] and len(outcomes) == 3
    records = {(r["id"], r["model"]): r for r in read_journal(journal_path(out))}
    grade = get_grader("number")
    for i, qid in enumerate(outcomes.ids):
        for j, model in enumerate(outcomes.models):
            record = records[(qid, model)]
            assert outcomes.scores[i, j] == float(grade(record["answer"], PROMPTS[int(qid[1:])][1]))
            assert record["prompt_tokens"] > 0 and record["latency_s"] > 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["cost"] == {"terse": 0.001, "chatty": 0.002}
    assert set(rows[0]["tokens"]) == {"terse", "chatty"} and set(rows[0]["latency_s"]) == {"terse", "chatty"}
    # "terse" got its system prompt and its 8-token limit, "chatty" its 16
    assert all(records[(q, "terse")]["completion_tokens"] <= 8 for q in outcomes.ids)
    assert all(records[(q, "chatty")]["completion_tokens"] <= 16 for q in outcomes.ids)

    # re-run on a superset: only the two new prompts are called
    second = labeller(pool_file, grader="number").run(
        read_prompt_rows(write_prompts(tmp_path / "p5.jsonl", 5)), out, progress=False
    )
    assert second.calls == 4 and second.rows_written == 5
    assert len(read_journal(journal_path(out))) == 10
    assert "| terse | 5 |" in second.table() and "| chatty | 5 |" in second.table()


def test_budget_stops_cleanly_and_resumes(llama_backends, tmp_path):
    pool_file = write_pool(tmp_path / "pool.json", llama_backends, cost_per_query=0.01)
    rows = read_prompt_rows(write_prompts(tmp_path / "p.jsonl", 5))
    out = tmp_path / "labels.jsonl"
    report = labeller(pool_file, grader="number", max_usd=0.05, concurrency=1).run(rows, out, progress=False)
    assert report.stopped is not None and "budget of $0.05 reached" in report.stopped
    spent = sum(r["usd"] for r in read_journal(journal_path(out)))
    # calls already under way finish: at most one per model beyond the budget (concurrency 1)
    assert 0.05 <= spent <= 0.05 + 0.03 + 1e-9
    answered = len(read_journal(journal_path(out)))
    assert answered < 10
    written = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(written) <= answered // 2  # only prompts graded for both models
    resumed = labeller(pool_file, grader="number").run(rows, out, progress=False)
    assert resumed.calls == 10 - answered and resumed.rows_written == 5 and resumed.stopped is None


#: the judge's reply, constrained by llama.cpp's grammar sampler: the form is fixed, the digit is the model's choice
JUDGE_GRAMMAR = 'root ::= "Score: " [1-5]'
JUDGE_COST = 0.0005


def ask_judge(base_url, alias, content):
    """The judge's reply to one grading prompt, asked of its llama.cpp server directly (no labeller)."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model=alias,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=16,
        extra_body={"grammar": JUDGE_GRAMMAR},
    )
    return reply.choices[0].message.content


def test_judge_grades_every_pair_with_its_own_verdict(llama_backends, tmp_path):
    """Every (prompt, model) pair asked is graded, and each grade is what the judge itself says of that answer."""
    from langchain_openai import ChatOpenAI

    pool, config = config_from_pool_file(write_pool(tmp_path / "pool.json", llama_backends))
    judge = langchain_backend(
        "judge",
        ChatOpenAI(
            base_url=llama_backends["large"],
            api_key="none",
            model="large",
            temperature=0,
            max_retries=0,
            extra_body={"max_tokens": 16, "grammar": JUDGE_GRAMMAR},
        ),
        PoolModel("judge", cost_per_query=JUDGE_COST),
    )
    # threshold 2: this judge's verdicts on these prompts fall on both sides of it (checked below)
    config = dataclasses.replace(config, judge=judge, threshold=2)
    rows = read_prompt_rows(write_prompts(tmp_path / "p.jsonl", 3, reference=False))
    out = tmp_path / "labels.jsonl"
    report = Labeller([openai_backend(m) for m in pool.models], config).run(rows, out, progress=False)
    records = read_journal(journal_path(out))
    asked = {(row["id"], m.name) for row in rows for m in pool.models}
    graded = [r for r in records if r["status"] == "graded"]
    assert report.calls == len(asked) == 6 and report.stopped is None
    assert {(r["id"], r["model"]) for r in graded} == asked, records  # every pair asked, and each graded
    assert {m: (s["graded"], s["skipped"], s["errors"]) for m, s in report.per_model.items()} == {
        m.name: (3, 0, 0) for m in pool.models
    }
    questions = {row["id"]: conversation_text(row["_messages"]) for row in rows}
    for r in graded:
        verdict = ask_judge(
            llama_backends["large"], "large", judge_prompt(questions[r["id"]], r["answer"], None, DEFAULT_RUBRIC)
        )
        assert r["judge_reply"] == verdict, r  # the judge's own verdict on that answer
        assert r["judge_score"] == parse_judge_score(verdict) == int(verdict[-1])
        assert r["score"] == float(r["judge_score"] >= 2) and r["graded_by"] == "judge"
        assert r["usd"] == pytest.approx(pool[r["model"]].cost_per_query + JUDGE_COST)  # the answer and its grading
    assert {r["score"] for r in graded} == {0.0, 1.0}, graded  # precondition: the threshold is crossed both ways
    # the training file carries exactly those verdicts, for every prompt
    assert report.rows_written == 3
    outcomes = load_outcomes(out)
    by_pair = {(r["id"], r["model"]): r["score"] for r in graded}
    assert sorted(outcomes.ids) == sorted(row["id"] for row in rows)
    for i, qid in enumerate(outcomes.ids):
        assert list(outcomes.scores[i]) == [by_pair[(qid, m)] for m in outcomes.models]
    assert Labeller([openai_backend(m) for m in pool.models], config).run(rows, out, progress=False).calls == 0


def test_judge_skips_a_malformed_reply_with_a_reason(llama_backends, tmp_path):
    """The judge left free (no grammar): SmolLM2's replies that hold no score are skipped with the reason."""
    pool_file = write_pool(tmp_path / "pool.json", llama_backends, judge=True)
    rows = read_prompt_rows(write_prompts(tmp_path / "p.jsonl", 3, reference=False))
    out = tmp_path / "labels.jsonl"
    report = labeller(pool_file).run(rows, out, progress=False)
    records = read_journal(journal_path(out))
    assert len(records) == 6 and report.stopped is None
    assert any(r["status"] == "skipped" for r in records), records  # precondition: the path under test is taken
    for r in records:
        assert r["status"] in ("graded", "skipped"), r
        if r["status"] == "graded":  # a parsable judge reply, mapped by the threshold (4)
            assert r["judge_score"] == parse_judge_score(r["judge_reply"])
            assert r["score"] == float(r["judge_score"] >= 4)
        else:  # a malformed judge reply: a skipped row with the reason, never a crash
            assert "the judge's reply" in r["reason"]
            with pytest.raises(JudgeParseError):
                parse_judge_score(r["judge_reply"])
    complete = {r["id"] for r in records if r["status"] == "graded"}
    complete = {
        q
        for q in complete
        if all(
            (q, m) in {(r["id"], r["model"]) for r in records if r["status"] == "graded"} for m in ("terse", "chatty")
        )
    }
    assert report.rows_written == len(complete)
    # skipped pairs are finished: a re-run does not call them again
    assert labeller(pool_file).run(rows, out, progress=False).calls == 0


def test_unreachable_model_is_retried_then_recorded(llama_backends, tmp_path):
    from llama_servers import dead_url

    down = openai_backend(PoolModel("down", cost_per_query=0.0, base_url=dead_url(), timeout=5))
    up = langchain_backend("up", _chat_openai(llama_backends["small"], "small"))  # the LangChain path
    rows = read_prompt_rows(write_prompts(tmp_path / "p.jsonl", 2))
    out = tmp_path / "labels.jsonl"
    report = Labeller([up, down], LabelConfig(grader="number", retries=1, backoff_s=0.01)).run(
        rows, out, progress=False
    )
    assert report.per_model["down"]["errors"] == 2 and report.per_model["up"]["graded"] == 2
    assert report.rows_written == 0  # no prompt has both labels
    assert all("Connection" in r["error"] for r in read_journal(journal_path(out)) if r["model"] == "down")


def _chat_openai(base_url, alias):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=base_url, api_key="none", model=alias, temperature=0, max_retries=0, extra_body={"max_tokens": 8}
    )


def test_cli_label(llama_backends, tmp_path, capsys):
    pool_file = write_pool(tmp_path / "pool.json", llama_backends)
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "labels.jsonl"
    assert (
        main(
            ["label", str(prompts), "--pool", str(pool_file), "--out", str(out), "--grader", "number", "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| terse | 2 |" in printed and "wrote 2 training rows" in printed
    assert len(load_outcomes(out)) == 2
    assert main(["label", str(prompts), "--pool", str(pool_file), "--out", str(out), "--grader", "fuzzy"]) == 2
    assert "unknown grader 'fuzzy'" in capsys.readouterr().err


def test_select_picks_the_most_uncertain_prompts(extractor, sample_outcomes):
    router = DifficultyRouter.pretrained(["cheap", "strong"], extractor=extractor)
    rows = [{"id": str(i), "_messages": q} for i, q in enumerate(sample_outcomes.queries[:40])]
    picked = select_uncertain(router, rows, 10, progress=False)
    proba = router.predict_proba([r["_messages"] for r in rows], progress=False)
    uncertainty = (proba * (1 - proba)).mean(axis=1)
    assert sorted(int(r["id"]) for r in picked) == sorted(np.argsort(-uncertainty)[:10].tolist())
    with pytest.raises(ValueError, match="positive count"):
        select_uncertain(router, rows, 0)


def test_uncertainty_order_ranks_by_variance_then_disagreement():
    proba = np.array(
        [
            [0.95, 0.99],  # sure: lowest variance
            [0.5, 0.5],  # most uncertain
            [0.3, 0.7],  # same mean variance as the next row, larger spread across models
            [0.7, 0.3],  # ... equal to the row above: the stable order keeps row 2 first
            [0.4, 0.6],
        ]
    )
    assert uncertainty_order(proba).tolist() == [1, 4, 2, 3, 0]
    # a tie on variance is broken by disagreement: p(1-p) = 0.21 for 0.3 and 0.7 alike
    tie = np.array([[0.3, 0.3], [0.3, 0.7]])
    assert uncertainty_order(tie).tolist() == [1, 0]
    with pytest.raises(ValueError, match="probabilities"):
        uncertainty_order(np.array([[0.2, 1.5]]))
    with pytest.raises(ValueError, match="matrix"):
        uncertainty_order(np.array([0.2, 0.5]))
