"""``label --engine ray`` on a real local Ray cluster (2 CPUs on loopback) against real llama.cpp servers.

The Ray engine must write what the single-process command writes (same journal records and training rows,
whatever order the calls finished in), resume from either engine's journal, keep one journal line per
finished pair when a worker dies mid-job, and stop at the budget. Both pool models answer greedily
(temperature 0) with one call at a time per model in the comparisons, so each llama.cpp server sees the
same requests in the same order under both engines and answers the same. Five short prompts, 8 tokens each.

Also here: ``serve --engine ray`` refuses the options its replicas cannot honour, before loading anything.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from helpers import write_label_pool, write_prompts

from difficulty_router.cli.main import main
from difficulty_router.data.labelling import (
    Backend,
    Labeller,
    config_from_pool_file,
    journal_path,
    openai_backend,
    read_journal,
    read_prompt_rows,
)
from difficulty_router.datasets import ROUTELLM_MMLU_POOL
from difficulty_router.scale.ray_label import RayLabeller

PAIRS = 10  # 5 prompts x 2 models
#: what must agree between the engines; latency does not
SAME = ("status", "answer", "score", "usd", "prompt_tokens", "completion_tokens")


# -- serve --engine ray: the zero-label router of --pretrained reaches the replicas as a saved bundle -----
def test_the_pretrained_router_is_saved_for_the_replicas(extractor):
    import numpy as np

    from difficulty_router import DifficultyRouter, ModelPool
    from difficulty_router.scale.commands import save_for_replicas

    router = DifficultyRouter.pretrained(ModelPool.load(ROUTELLM_MMLU_POOL), extractor=extractor)
    dirs = save_for_replicas({"router": router})
    loaded = DifficultyRouter.load(dirs["router"], extractor)
    queries = ["What is 2 + 2?", "Prove that there are infinitely many primes."]
    models = [d.model for d in router.route_batch(queries, progress=False)]
    assert [d.model for d in loaded.route_batch(queries, progress=False)] == models
    np.testing.assert_allclose(loaded.predict_proba(queries), router.predict_proba(queries), atol=1e-6)


# -- label --engine ray ------------------------------------------------------------------------------------
# ray_cluster: the module-scoped local cluster in conftest.py
def write_greedy_pool(path, backends, cost_per_query=0.001):
    """"terse" and "wordy", both greedy with 8 tokens, so both engines get the same answers."""
    return write_label_pool(path, backends, "wordy", {"temperature": 0.0, "max_tokens": 8}, cost_per_query=cost_per_query)


def make(pool_file, engine="local", **overrides):
    pool, config = config_from_pool_file(pool_file, grader="number", concurrency=overrides.pop("concurrency", 1),
                                         **overrides)
    backends = [openai_backend(m) for m in pool.models]
    return Labeller(backends, config) if engine == "local" else RayLabeller(backends, config, workers=2)


def journal_lines(out):
    """Every line of the journal (read_journal keeps only the latest per pair, which would hide a duplicate)."""
    return [json.loads(line) for line in journal_path(out).read_text().splitlines() if line.strip()]


def by_pair(out):
    return {(r["id"], r["model"]): {k: r.get(k) for k in SAME} for r in read_journal(journal_path(out))}


def training_rows(out):
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        row.pop("latency_s")
    return rows


def without_latency(per_model):
    return {name: {k: v for k, v in s.items() if k != "latency_s"} for name, s in per_model.items()}


@pytest.fixture(scope="module")
def prompt_rows(tmp_path_factory):
    return read_prompt_rows(write_prompts(tmp_path_factory.mktemp("prompts") / "p5.jsonl", 5))


@pytest.fixture(scope="module")
def pool_file(llama_backends, tmp_path_factory):
    return write_greedy_pool(tmp_path_factory.mktemp("pool") / "pool.json", llama_backends)


@pytest.fixture(scope="module")
def single_process_output(pool_file, prompt_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "labels.jsonl"
    report = make(pool_file).run(prompt_rows, out, progress=False)
    assert report.calls == PAIRS and report.stopped is None
    return out, report


def test_ray_labels_equal_single_process_labels(ray_cluster, pool_file, prompt_rows, single_process_output, tmp_path):
    reference, reference_report = single_process_output
    out = tmp_path / "labels.jsonl"
    report = make(pool_file, "ray").run(prompt_rows, out, progress=False)
    assert report.calls == PAIRS and report.stopped is None
    lines = journal_lines(out)
    assert len(lines) == PAIRS and len({(r["id"], r["model"]) for r in lines}) == PAIRS
    assert by_pair(out) == by_pair(reference)
    assert training_rows(out) == training_rows(reference)
    assert report.rows_written == reference_report.rows_written
    assert without_latency(report.per_model) == without_latency(reference_report.per_model)


def test_ray_resumes_a_single_process_journal_without_duplicates(ray_cluster, pool_file, prompt_rows, tmp_path):
    out = tmp_path / "labels.jsonl"
    first = make(pool_file).run(prompt_rows[:2], out, progress=False)
    assert first.calls == 4
    resumed = make(pool_file, "ray").run(prompt_rows, out, progress=False)
    assert resumed.calls == PAIRS - 4 and resumed.rows_written == 5
    lines = journal_lines(out)
    assert len(lines) == PAIRS and len({(r["id"], r["model"]) for r in lines}) == PAIRS
    assert make(pool_file, "ray").run(prompt_rows, out, progress=False).calls == 0


def test_a_worker_killed_mid_job_loses_and_duplicates_no_row(
    ray_cluster, pool_file, prompt_rows, single_process_output, tmp_path
):
    """The worker calling terse on q2 gets the real answer, then kills its process before returning, as a lost
    machine would (the fault is in the test's backend, which the workers receive like any backend: a marker
    file on disk makes only the first attempt crash). Ray restarts the worker and makes that call again; the
    journal holds every pair exactly once, with the single-process answers and grades."""
    reference, _ = single_process_output
    marker, out = tmp_path / "crashed", tmp_path / "labels.jsonl"
    pool, config = config_from_pool_file(pool_file, grader="number", concurrency=1)
    terse, wordy = pool.models
    q2 = next(row for row in prompt_rows if row["id"] == "q2")["prompt"]

    class CrashOnce:  # defined here so that Ray ships it by value to the workers
        def __init__(self, call):
            self.call = call

        def __call__(self, messages, settings):
            reply = self.call(messages, settings)
            if messages[-1]["content"] == q2 and not os.path.exists(marker):
                marker.write_text(f"q2 {terse.name}")
                os._exit(1)
            return reply

    backends = [Backend(terse.name, CrashOnce(openai_backend(terse).call), terse), openai_backend(wordy)]
    report = RayLabeller(backends, config, workers=2).run(prompt_rows, out, progress=False)
    assert marker.exists(), "the fault was not injected"
    lines = journal_lines(out)
    assert Counter((r["id"], r["model"]) for r in lines) == Counter({pair: 1 for pair in by_pair(reference)})
    assert all(r["status"] == "graded" for r in lines), [r for r in lines if r["status"] != "graded"]
    assert by_pair(out) == by_pair(reference) and report.rows_written == 5


def test_the_per_model_limit_holds_across_workers(ray_cluster, pool_file, prompt_rows, tmp_path):
    """With only one model's calls left (the other's are in the journal already), 2 workers x 2 threads could
    run 4 of its calls at once; the start and end of each real endpoint call, written by the workers, never
    overlap more than ``concurrency`` (2)."""
    import time as clock

    from difficulty_router.data.labelling import Backend

    log, out = tmp_path / "calls.log", tmp_path / "labels.jsonl"

    class Timed:  # defined here so that Ray ships it by value to the workers
        def __init__(self, name, call):
            self.name, self.call = name, call

        def __call__(self, messages, settings):
            start = clock.time()
            try:
                return self.call(messages, settings)
            finally:
                with open(log, "a") as fh:
                    fh.write(f"{start} {clock.time()}\n")

    pool, config = config_from_pool_file(pool_file, grader="number", concurrency=2)
    terse, wordy = pool.models
    assert Labeller([openai_backend(wordy)], config).run(prompt_rows, out, progress=False).calls == 5
    backends = [Backend(terse.name, Timed(terse.name, openai_backend(terse).call), terse), openai_backend(wordy)]
    report = RayLabeller(backends, config, workers=2).run(prompt_rows, out, progress=False)
    assert report.calls == 5 and report.rows_written == 5
    events = []
    for line in log.read_text().splitlines():
        start, end = map(float, line.split())
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events):  # at equal times an end (-1) sorts before a start
        running += step
        peak = max(peak, running)
    assert len(events) == 10 and peak == 2, peak


def test_budget_stops_the_ray_engine_cleanly_and_resumes(ray_cluster, llama_backends, prompt_rows, tmp_path):
    pool_file = write_greedy_pool(tmp_path / "pool.json", llama_backends, cost_per_query=0.01)
    out = tmp_path / "labels.jsonl"
    report = make(pool_file, "ray", max_usd=0.05).run(prompt_rows, out, progress=False)
    assert report.stopped is not None and "budget of $0.05 reached" in report.stopped
    lines = journal_lines(out)
    spent = sum(r["usd"] for r in lines)
    # calls already under way finish: at most one per model beyond the budget (concurrency 1 per model)
    assert 0.05 <= spent <= 0.05 + 0.03 + 1e-9
    assert len(lines) < PAIRS and len({(r["id"], r["model"]) for r in lines}) == len(lines)
    resumed = make(pool_file, "ray").run(prompt_rows, out, progress=False)
    assert resumed.calls == PAIRS - len(lines) and resumed.rows_written == 5 and resumed.stopped is None
    assert len(journal_lines(out)) == PAIRS


def test_cli_label_with_the_ray_engine(ray_cluster, pool_file, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "labels.jsonl"
    argv = ["label", str(prompts), "--pool", str(pool_file), "--out", str(out), "--grader", "number"]
    assert main([*argv, "--engine", "ray", "--workers", "2", "--concurrency", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| terse | 3 |" in printed and "| wordy | 3 |" in printed and "wrote 3 training rows" in printed
    assert len(journal_lines(out)) == 6
    assert main([*argv, "--engine", "ray", "--no-progress"]) == 0
    assert "0 calls" in capsys.readouterr().out


def test_backends_that_do_not_pickle_are_refused_clearly(tmp_path, prompt_rows):
    import threading

    from difficulty_router.data.labelling import Backend, LabelConfig, Reply

    lock = threading.Lock()  # a lock does not pickle: the kind of state a client object carries

    def call(messages, settings):
        with lock:
            return Reply("4", 1, 1)

    labeller = RayLabeller([Backend("local", call)], LabelConfig(grader="number"), workers=1)
    with pytest.raises(TypeError, match="do not pickle"):
        labeller.run(prompt_rows[:1], tmp_path / "labels.jsonl", progress=False)
