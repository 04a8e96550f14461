"""Scale-out on a real local Ray cluster (2 CPUs on loopback, started once for the module).

Distributed extraction must give the single-process features (float32 tolerance), share the feature
cache with single-process extraction, and lose or duplicate no row when a worker dies mid-job.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa  # the dev install includes the ray extra (ray, pyarrow): a missing one is an error, not a skip
import pyarrow.parquet as pq
import pytest
from helpers import backend_specs, openai_client

from difficulty_router import ActivationExtractor
from difficulty_router.extraction.feature_cache import FeatureCache
from difficulty_router.extraction.numerics import FEATURE_RTOL
from difficulty_router.extraction.readout import relative_block_error
from difficulty_router.scale.ray_extract import extract_distributed
from difficulty_router.scale.shards import FeatureShards

N_PROMPTS = 200
#: A shallow read-out of short prompts keeps ~200 forward passes quick on 2 shared cores.
READOUT = {"layers": 0.3, "max_tokens": 64, "dtype": "float32"}


# ray_cluster: the module-scoped local cluster in conftest.py


@pytest.fixture(scope="module")
def prompts(sample_outcomes):
    """The first rows of the shipped RouteLLM MMLU sample (chat conversations), all distinct."""
    rows = sample_outcomes.subset(np.arange(N_PROMPTS))
    assert len({json.dumps(q) for q in rows.queries}) == N_PROMPTS
    return rows


@pytest.fixture(scope="module")
def prompts_jsonl(prompts, tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for query in prompts.queries:
            fh.write(json.dumps({"messages": query}) + "\n")
    return path


@pytest.fixture(scope="module")
def single_process():
    return ActivationExtractor("smollm2-135m", pooling="last", **READOUT)


@pytest.fixture(scope="module")
def reference(single_process, prompts):
    """Single-process features and their content keys, extracted without any cache."""
    result = single_process.extract(prompts.queries, progress=False)
    ids, _ = single_process.tokenize(prompts.queries)
    keys = [
        FeatureCache.row_key(single_process._cache_key, single_process.layers, single_process.pooling, x) for x in ids
    ]
    return keys, result.features


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def distributed(ray_cluster, prompts_jsonl, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return extract_distributed(
        prompts_jsonl, out, workers=2, rows_per_shard=50, feature_cache=cache_dir, pooling="last", **READOUT
    )


def _assert_exactly_once(shards: FeatureShards, expected_keys: list[str]) -> None:
    keys = shards.keys()
    assert len(keys) == len(set(keys)), "a row appears twice in the shards"
    assert set(keys) == set(expected_keys), "rows are missing from the shards"
    assert shards.n_rows == len(expected_keys)
    on_disk = sorted(p.name for p in shards.directory.glob("part-*.parquet"))
    assert on_disk == sorted(shards.manifest["shards"]), "a shard outside the manifest was left behind"


def test_distributed_features_equal_single_process(distributed, reference, single_process):
    keys, features = reference
    _assert_exactly_once(distributed, keys)
    assert distributed.manifest["workers"] == 2 and len(distributed.shards) == N_PROMPTS // 50
    got = distributed.lookup(keys)
    error = relative_block_error(got, features, distributed.manifest["hidden_size"])
    assert error.max() <= FEATURE_RTOL[single_process.dtype], error.max()


def test_distributed_rows_land_in_the_shared_feature_cache(distributed, reference, cache_dir, prompts):
    """The workers wrote every row to the cache, so a single-process extractor reading that cache runs no
    forward pass and returns the shard rows exactly."""
    keys, _ = reference
    cached = ActivationExtractor("smollm2-135m", pooling="last", feature_cache=cache_dir, **READOUT)
    calls = []
    original = cached._forward
    cached._forward = lambda *a, **k: calls.append(1) or original(*a, **k)  # count forward passes, run them
    result = cached.extract(prompts.queries, progress=False)
    assert calls == []
    np.testing.assert_array_equal(result.features, distributed.lookup(keys))


def test_parquet_input_is_served_from_the_cache(ray_cluster, distributed, reference, cache_dir, prompts, tmp_path):
    """Parquet with a messages column (list of structs) reads like JSON Lines; rows already cached are not
    run again, so they match the earlier run bit for bit."""
    keys, _ = reference
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"messages": prompts.queries[:30], "id": list(range(30))}), path)
    shards = extract_distributed(
        path, tmp_path / "out", workers=2, rows_per_shard=10, feature_cache=cache_dir, pooling="last", **READOUT
    )
    _assert_exactly_once(shards, keys[:30])
    np.testing.assert_array_equal(shards.lookup(keys[:30]), distributed.lookup(keys[:30]))


def crash_once_worker(marker: str, prompt):
    """An actor class for ``extract_distributed`` that wraps the real ``ExtractorWorker``: the first time a batch
    holds ``prompt`` (no ``marker`` file on disk yet), the real worker writes its shard, then this one creates
    the marker and kills its own process before returning, as a machine loss would. The retried batch finds
    the marker and returns normally. Defined in a function so that Ray ships it by value; the real worker is
    imported inside the actor, whose process never sees the driver's monkeypatch."""

    class CrashOnceWorker:
        def __init__(self, config: dict) -> None:
            from difficulty_router.scale.ray_extract import ExtractorWorker, _query

            self.worker, self.config, self.parse = ExtractorWorker(config), config, _query

        def __call__(self, batch):
            out = self.worker(batch)  # the shard is on disk now
            queries = [self.parse(v, self.config["kind"]) for v in batch.column(self.config["column"]).to_pylist()]
            if prompt in queries and not os.path.exists(marker):
                with open(marker, "w") as fh:
                    fh.write(str(out["shard"][0]))
                os._exit(1)
            return out

    return CrashOnceWorker


def test_a_worker_killed_mid_job_loses_and_duplicates_no_row(
    ray_cluster, distributed, prompts_jsonl, reference, cache_dir, tmp_path, monkeypatch, single_process
):
    """The worker that meets the marked prompt writes its shard, then its process exits (as on a lost
    machine). Ray restarts the actor and retries the batch; the result holds every row exactly once and
    agrees with single-process extraction."""
    from difficulty_router.scale import ray_extract

    keys, features = reference
    marker = tmp_path / "crashed"
    marked = json.loads(prompts_jsonl.read_text().splitlines()[123])["messages"]
    monkeypatch.setattr(ray_extract, "ExtractorWorker", crash_once_worker(str(marker), marked))
    shards = extract_distributed(
        prompts_jsonl,
        tmp_path / "out",
        workers=2,
        rows_per_shard=25,
        feature_cache=cache_dir,  # the retried batch is served from the cache: quick, and still exactly once
        pooling="last",
        **READOUT,
    )
    assert marker.exists(), "the fault was not injected"
    assert marker.read_text() in shards.manifest["shards"]  # the dead worker's shard, rewritten by the retry
    _assert_exactly_once(shards, keys)
    error = relative_block_error(shards.lookup(keys), features, shards.manifest["hidden_size"])
    assert error.max() <= FEATURE_RTOL[single_process.dtype]


def test_bad_input_is_refused_with_a_clear_error(ray_cluster, tmp_path):
    bad = tmp_path / "prompts.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"expected \.jsonl, \.json, \.txt or \.parquet"):
        extract_distributed(bad, tmp_path / "out")
    no_column = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text_only": ["hi"]}), no_column)
    with pytest.raises(ValueError, match="needs a column named one of"):
        extract_distributed(no_column, tmp_path / "out2")


def test_extract_command_with_the_ray_engine(ray_cluster, distributed, prompts_jsonl, reference, cache_dir, tmp_path):
    from difficulty_router.cli.main import main

    keys, _ = reference
    small = tmp_path / "ten.jsonl"
    small.write_text("".join(prompts_jsonl.read_text().splitlines(keepends=True)[:10]))
    argv = ["extract", "--engine", "ray", "--input", str(small), "--output", str(tmp_path / "out"), "--layers", "0.3"]
    argv += ["--max-tokens", "64", "--dtype", "float32", "--workers", "1", "--rows-per-shard", "5"]
    assert main([*argv, "--feature-cache", str(cache_dir)]) == 0
    shards = FeatureShards(tmp_path / "out")
    _assert_exactly_once(shards, keys[:10])
    assert len(shards.shards) == 2


# -- training from shards ------------------------------------------------------------------------------


def test_streamed_solver_reaches_the_in_memory_logistic_fit(distributed, prompts, single_process):
    """The out-of-core pieces against their in-memory counterparts on the same rows: the streamed
    standardiser is exact, and averaged SGD on streamed mini-batches (10 epochs, batches of 64) lands on the
    in-memory L2 logistic regression of the same C: their logits correlate >= 0.97 (measured 0.99 on these
    rows; the scale differs, which the Platt calibration fitted afterwards absorbs).

    Why not compare routing quality here: on 200 rows the held-out APGR of the in-memory fit alone moves
    from 0.13 to 0.97 between splits (measured), so no tolerance would be both honest and able to fail;
    benchmarks/scale_out.py compares quality on more rows."""
    from difficulty_router.learning.probes import Standardizer, _fit_logistic
    from difficulty_router.scale.shard_training import _rows_of, shard_keys, stream_logistic, stream_standardiser

    keys, _ = shard_keys(single_process, distributed, prompts.queries)
    X = distributed.lookup(keys).astype(np.float64)
    train = np.ones(len(keys), dtype=bool)
    train[::5] = False
    rows = _rows_of(keys)
    mean, scale, count, sample = stream_standardiser(distributed, rows, train, 64, np.random.default_rng(0))
    reference = Standardizer().fit(X[train])
    np.testing.assert_allclose(mean, reference.mean_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(scale, reference.scale_, rtol=1e-9)
    assert count == train.sum() and len(sample) == len(keys)
    models = stream_logistic(distributed, rows, prompts.scores, train, mean, scale, count, (0.001,), 10, 64, 0)
    assert {j for j, _ in models} == {0, 1}
    Z = reference.transform(X)
    for (j, C), clf in models.items():
        w, b = _fit_logistic(Z[train], prompts.scores[train, j], C, 0)
        assert np.corrcoef(Z @ w + b, clf.decision_function(Z))[0, 1] >= 0.97


def test_train_from_shards_in_memory_and_streamed_save_normal_bundles(
    distributed, prompts, single_process, sample_pool, tmp_path
):
    from difficulty_router import DifficultyRouter
    from difficulty_router.scale.shard_training import train_from_shards

    in_memory = train_from_shards(
        prompts, sample_pool, single_process, distributed.directory, families=("activation",), progress=False
    )
    assert in_memory.info["training"]["features_from"]["mode"] == "in-memory"
    streamed = train_from_shards(prompts, sample_pool, single_process, distributed, memory_budget=0, progress=False)
    source = streamed.info["training"]["features_from"]
    assert source["mode"] == "streamed" and source["bytes_in_memory"] > 0
    assert streamed.layers == in_memory.layers == distributed.layers
    queries = prompts.queries[:20]
    for router, name in ((in_memory, "in-memory"), (streamed, "streamed")):
        router.save(tmp_path / name)
        loaded = DifficultyRouter.load(tmp_path / name, single_process)
        np.testing.assert_allclose(loaded.predict_proba(queries), router.predict_proba(queries), atol=1e-6)
        assert [d.model for d in loaded.route_batch(queries)] == [d.model for d in router.route_batch(queries)]


def test_shards_from_another_read_out_are_refused(distributed, prompts, sample_pool):
    from difficulty_router.scale.shard_training import train_from_shards

    other = ActivationExtractor("smollm2-135m", pooling="last", layers=0.3, max_tokens=32, dtype="float32")
    with pytest.raises(ValueError, match="max_tokens 64"):
        train_from_shards(prompts, sample_pool, other, distributed, progress=False)


# -- Ray Serve -----------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
API_KEY = "serve-test-key"


@pytest.fixture(scope="module")
def serve_pair(ray_cluster, trained_router, llama_backends, tmp_path_factory):
    """The same routers behind Ray Serve (2 replicas, @serve.batch) and behind the plain server: a live pool,
    and (authenticated) a pool whose weak backend is down with a router that always picks the weak model."""
    from llama_servers import dead_url, free_port
    from ray import serve
    from server_helpers import running, with_policy

    from difficulty_router.scale.ray_metrics import drop_metrics_board, metrics_board_name
    from difficulty_router.scale.ray_serve import APP_NAME, build_app
    from difficulty_router.scale.ray_serve import run as run_serve
    from difficulty_router.server import create_app

    live_dir, cheap_dir = tmp_path_factory.mktemp("router"), tmp_path_factory.mktemp("cheapest")
    trained_router.save(live_dir)
    cheapest = with_policy(trained_router, "threshold", 0.0)
    cheapest.save(cheap_dir)
    down = backend_specs(llama_backends, weak_url=dead_url())
    live = build_app({"router": live_dir}, backend_specs(llama_backends), replicas=2, cpus_per_replica=0.5, max_batch=4)
    failing = build_app({"router": cheap_dir}, down, cpus_per_replica=0.5, app_options={"api_key": API_KEY})
    serve_url = run_serve(live, port=free_port())
    serve.run(failing, name="failing", route_prefix="/failing")
    with (
        running(create_app(trained_router, backend_specs(llama_backends))) as plain_url,
        running(create_app(cheapest, down, api_key=API_KEY)) as plain_failing_url,
    ):
        yield {
            "serve": serve_url,
            "plain": plain_url,
            "serve_failing": serve_url + "/failing",
            "plain_failing": plain_failing_url,
        }
    serve.shutdown()
    drop_metrics_board(metrics_board_name(APP_NAME))


def _ask(url, **kwargs):
    raw = openai_client(url, kwargs.pop("api_key", "unused")).chat.completions.with_raw_response.create(
        model="router", messages=MESSAGES, max_tokens=8, temperature=0, **kwargs
    )
    return raw.headers, raw.parse()


def test_serve_answers_like_the_plain_server(serve_pair):
    headers, completion = _ask(serve_pair["serve"])
    plain_headers, plain = _ask(serve_pair["plain"])
    assert completion.model == plain.model == headers["x-router-decision"] == plain_headers["x-router-decision"]
    assert completion.choices[0].message.content == plain.choices[0].message.content
    got, expected = json.loads(headers["x-router-probabilities"]), json.loads(plain_headers["x-router-probabilities"])
    assert got == pytest.approx(expected, abs=2e-4)
    assert completion.model_extra["router"]["requested"] == plain.model_extra["router"]["requested"] == "router"
    models = [m.id for m in openai_client(serve_pair["serve"]).models.list().data]
    assert models == [m.id for m in openai_client(serve_pair["plain"]).models.list().data]


def test_serve_streams_like_the_plain_server(serve_pair):
    def stream(url):
        chunks = list(
            openai_client(url).chat.completions.create(
                model="router", messages=MESSAGES, max_tokens=6, temperature=0, stream=True
            )
        )
        return {c.model for c in chunks}, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    models, text = stream(serve_pair["serve"])
    assert text.strip() and (models, text) == stream(serve_pair["plain"])


def test_serve_escalates_past_a_dead_backend_and_keeps_auth(serve_pair):
    import openai
    from conftest import STRONG, WEAK

    for url in (serve_pair["serve_failing"], serve_pair["plain_failing"]):
        with pytest.raises(openai.AuthenticationError):
            _ask(url)
        headers, completion = _ask(url, api_key=API_KEY)
        assert headers["x-router-decision"] == WEAK and headers["x-router-escalated-from"] == WEAK
        assert completion.model == STRONG == headers["x-router-model"]


def test_serve_batches_concurrent_reads_and_exposes_metrics(serve_pair):
    """Concurrent requests are all answered with the decision the plain server gives; /metrics and /health
    answer from a replica."""
    import concurrent.futures

    import httpx

    questions = [f"What is {i} plus {i}?" for i in range(8)]

    def decide(url, question):
        raw = openai_client(url).chat.completions.with_raw_response.create(
            model="router", messages=[{"role": "user", "content": question}], max_tokens=1, temperature=0
        )
        return raw.headers["x-router-decision"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda q: decide(serve_pair["serve"], q), questions))
    assert served == [decide(serve_pair["plain"], q) for q in questions]
    metrics = httpx.get(serve_pair["serve"] + "/metrics").text
    assert "difficulty_router_routing_decisions_total" in metrics
    assert httpx.get(serve_pair["serve"] + "/health").json()["status"] == "ok"


# -- sessions shared by the replicas (one named Ray actor holds the states) ------------------------------


def _state(model: str):
    from difficulty_router.routing.sessions import SessionState

    return SessionState(model=model, turns=1, context_tokens=0, switches=0, last_seen=0.0)


def test_the_shared_session_store_keeps_its_bound_ttl_and_key_checks(ray_cluster):
    """Two clients of one store actor (as two replicas hold) see one set of sessions; the in-process
    store's LRU bound, TTL and key checks hold across them; bad settings and keys are refused by name."""
    import time

    from difficulty_router.scale.ray_sessions import RaySessionStore, drop_session_store, start_session_store

    name = "sessions/test/bounds"
    store = start_session_store(name, max_sessions=2, ttl_s=2.0)
    try:
        other = RaySessionStore(name)
        assert (other.max_sessions, other.ttl_s) == (2, 2.0)
        store.put("a", _state("weak"))
        store.put("b", _state("strong"))
        assert other.get("a").model == "weak"  # written by one client, read by the other; "a" is now the latest
        other.put("c", _state("weak"))  # a third session: the least recently used ("b") goes
        assert "b" not in store and len(store) == 2 and store.counts()["evicted"] == 1
        assert other.delete("c") and not other.delete("c") and len(store) == 1
        time.sleep(2.2)  # longer than the TTL since "a" was last used
        assert store.get("a") is None and len(other) == 0 and store.counts()["expired"] == 1
        for bad, error in (("", ValueError), ("x" * 513, ValueError), (7, TypeError)):
            with pytest.raises(error, match="session key"):
                other.get(bad)
        with pytest.raises(TypeError, match="state must be a SessionState"):
            store.put("a", {"model": "weak"})
        with pytest.raises(ValueError, match=r"already runs with \{'max_sessions': 2"):
            start_session_store(name, max_sessions=3, ttl_s=2.0)
        with pytest.raises(ValueError, match="max_sessions must be an integer >= 1"):
            start_session_store("sessions/test/bad", max_sessions=0)
        with pytest.raises(ValueError, match="no session store actor named 'sessions/test/none'"):
            RaySessionStore("sessions/test/none")
    finally:
        assert drop_session_store(name)
    assert not drop_session_store(name)


def test_one_writer_actor_keeps_a_shared_decision_log_whole(ray_cluster, tmp_path):
    """Two clients of one writer actor (as two replicas hold), appending from 8 threads: every record lands
    exactly once, whole, and the log rotates at its bound; bad entries, paths and settings are refused."""
    from concurrent.futures import ThreadPoolExecutor

    from difficulty_router.routing.decision_log import read_log
    from difficulty_router.scale.ray_decision_log import RayDecisionLog, drop_decision_log, start_decision_log

    name, path = "decisions/test", tmp_path / "decisions.jsonl"
    first = start_decision_log(name, path, max_bytes=4000)
    try:
        second = RayDecisionLog(name)
        assert second.path == path and second.max_bytes == 4000

        def write(i):
            (first if i % 2 else second).append({"query_id": f"q{i}", "chosen": "weak"})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write, range(60)))
        assert sorted(r["query_id"] for r in read_log(path)) == sorted(f"q{i}" for i in range(60))
        files = sorted(tmp_path.glob("decisions.jsonl*"))
        assert len(files) >= 3 and all(f.stat().st_size <= 4000 for f in files), files  # rotated, none past the bound
        with pytest.raises(ValueError, match="decision log entries take only"):
            second.append({"bogus": 1})
        with pytest.raises(ValueError, match="already runs with"):
            start_decision_log(name, tmp_path / "other.jsonl")
        with pytest.raises(ValueError, match="is a directory"):
            start_decision_log("decisions/test-dir", tmp_path)
        with pytest.raises(ValueError, match="no decision log writer named 'decisions/none'"):
            RayDecisionLog("decisions/none")
    finally:
        assert drop_decision_log(name)


@pytest.fixture(scope="module")
def sessions_app(serve_pair, trained_router, llama_backends, tmp_path_factory):
    """A third application on the running Serve: 2 replicas of the live router under the sticky session
    policy, its sessions in one store actor, its decisions in one log written by one actor."""
    from ray import serve

    from difficulty_router.scale.ray_decision_log import decision_log_name, drop_decision_log
    from difficulty_router.scale.ray_metrics import drop_metrics_board, metrics_board_name
    from difficulty_router.scale.ray_serve import build_app
    from difficulty_router.scale.ray_sessions import drop_session_store, session_store_name

    directory = tmp_path_factory.mktemp("router-sessions")
    trained_router.save(directory)
    log = tmp_path_factory.mktemp("decision-log") / "decisions.jsonl"
    options = {"session_policy": "sticky", "session_ttl": 600.0, "max_sessions": 100}
    app = build_app(
        {"router": directory},
        backend_specs(llama_backends),
        replicas=2,
        cpus_per_replica=0.25,  # the module's 2 CPUs: 1.5 held by serve_pair's replicas
        app_options=options,
        app_name="sessions",
        decision_log=log,
    )
    serve.run(app, name="sessions", route_prefix="/sessions")
    yield {"url": serve_pair["serve"] + "/sessions", "log": log}
    serve.delete("sessions")
    drop_session_store(session_store_name("sessions", "router"))
    drop_decision_log(decision_log_name("sessions"))
    drop_metrics_board(metrics_board_name("sessions"))


def test_a_session_keeps_its_model_across_replicas(sessions_app, trained_router, sample_outcomes):
    """Turn 1 asks a question the router sends to the strong model, later turns questions it sends to the
    weak one: sticky keeps the strong model, on whichever replica takes the turn. With a store per replica
    the first turn a second replica takes would be its 'first' and go to the weak model. Both replicas'
    decisions land in the one decision log, once each."""
    import time

    from conftest import STRONG, WEAK

    from difficulty_router.routing.decision_log import read_log
    from difficulty_router.scale.ray_sessions import RaySessionStore, session_store_name

    queries = sample_outcomes.queries[240:300]  # rows the router was not trained on
    picks = [d.model for d in trained_router.route_batch(queries, progress=False)]
    hard, easy = queries[picks.index(STRONG)], queries[picks.index(WEAK)]
    client = openai_client(sessions_app["url"])
    replicas, turn, query_ids = set(), 0, []
    while turn < 16 and (len(replicas) < 2 or turn < 4):
        turn += 1
        raw = client.chat.completions.with_raw_response.create(
            model="router",
            messages=hard if turn == 1 else easy,
            max_tokens=1,
            temperature=0,
            extra_headers={"X-Session-Id": "conversation-1"},
        )
        headers = raw.headers
        replicas.add(headers["x-router-replica"])
        query_ids.append(headers["x-router-query-id"])
        assert headers["x-router-decision"] == headers["x-router-model"] == STRONG, f"turn {turn}"
        assert headers["x-router-session-turn"] == str(turn)
        assert headers["x-router-session-action"] == ("first" if turn == 1 else "kept")
    assert len(replicas) == 2, f"every turn went to one replica ({replicas}); the sharing was not exercised"
    store = RaySessionStore(session_store_name("sessions", "router"))
    assert store.get("conversation-1").model == STRONG and store.counts()["sessions"] == 1
    deadline = time.monotonic() + 20  # each replica appends after its response (a background task)
    while time.monotonic() < deadline:
        records = list(read_log(sessions_app["log"])) if sessions_app["log"].exists() else []
        if len(records) >= len(query_ids):
            break
        time.sleep(0.2)
    assert sorted(r["query_id"] for r in records) == sorted(query_ids)
    assert [r["session"]["turn"] for r in sorted(records, key=lambda r: r["session"]["turn"])] == list(
        range(1, turn + 1)
    )
    assert {r["chosen"] for r in records} == {r["served_by"] for r in records} == {STRONG}


def two_more_replicas(router, llama_backends, directory, **options):
    """A further application of 2 replicas of ``router`` (saved under ``directory``) on the running Serve, for a
    test of its own; the module's CPUs are all held by serve_pair and sessions_app, so these replicas take
    none (they wait on I/O, and routing a few requests needs no reserved CPU)."""
    from difficulty_router.scale.ray_serve import build_app

    router.save(directory / "router")
    return build_app(
        {"router": directory / "router"}, backend_specs(llama_backends), replicas=2, cpus_per_replica=0, **options
    )


def test_replicas_share_sessions_in_redis_without_an_actor(serve_pair, trained_router, llama_backends, tmp_path):
    """With ``session_store`` naming a Redis (``serve --engine ray --session-store redis://...``), no store actor
    starts: the stores pickle to the replicas as their URL and settings, each replica opens its own client, and
    a session started on one replica is kept on the other (the states are in the one Redis)."""
    import ray
    from ray import serve
    from redis_server import redis_server

    from difficulty_router.routing.redis_sessions import RedisSessionStores
    from difficulty_router.scale.named_actors import NAMESPACE
    from difficulty_router.scale.ray_metrics import drop_metrics_board, metrics_board_name
    from difficulty_router.scale.ray_sessions import session_store_name

    with redis_server(tmp_path) as server:
        stores = RedisSessionStores(server.url, max_sessions=50, ttl_s=600.0)
        app = two_more_replicas(
            trained_router,
            llama_backends,
            tmp_path,
            app_options={"session_policy": "sticky", "session_margin": 1.0, "session_store": stores},
            app_name="redis-sessions",
        )
        with pytest.raises(ValueError):  # no actor was started for this application's sessions
            ray.get_actor(session_store_name("redis-sessions", "router"), namespace=NAMESPACE)
        serve.run(app, name="redis-sessions", route_prefix="/redis-sessions")
        try:
            client = openai_client(serve_pair["serve"] + "/redis-sessions")
            replicas, models, turn = set(), set(), 0
            while turn < 16 and (len(replicas) < 2 or turn < 4):
                turn += 1
                raw = client.chat.completions.with_raw_response.create(
                    model="router",
                    messages=[{"role": "user", "content": f"Question {turn}: what is {turn} + {turn}?"}],
                    max_tokens=1,
                    temperature=0,
                    extra_headers={"X-Session-Id": "redis-conversation"},
                )
                replicas.add(raw.headers["x-router-replica"])
                models.add(raw.headers["x-router-model"])
                assert raw.headers["x-router-session-turn"] == str(turn)
                assert raw.headers["x-router-session-action"] == ("first" if turn == 1 else "kept")
            assert len(replicas) == 2, f"every turn went to one replica ({replicas}); the sharing was not exercised"
            assert len(models) == 1, f"the session moved between models: {models}"
            state = stores("router").get("redis-conversation")
            assert state.turns == turn and state.model in models
        finally:
            serve.delete("redis-sessions")
            drop_metrics_board(metrics_board_name("redis-sessions"))


def test_every_replica_applies_ood_and_shadow(serve_pair, trained_router, llama_backends, sample_outcomes, tmp_path):
    """ood_percentile and shadow mode reach each replica: with the bar at the 1st percentile of the training
    read-outs, a query the plain deployment sends to the weak model would go to the strong one as novel, and
    in shadow mode the weak backend serves it while the headers name the strong as the would-be choice, on
    both replicas."""
    from conftest import STRONG, WEAK
    from ray import serve


    assert trained_router.novelty is not None
    queries = sample_outcomes.queries[240:300]
    picks = [d.model for d in trained_router.route_batch(queries, progress=False)]
    easy = queries[picks.index(WEAK)]
    app = two_more_replicas(trained_router, llama_backends, tmp_path, ood_percentile=1.0, app_options={"shadow": WEAK})
    serve.run(app, name="ood", route_prefix="/ood")
    try:

        def ask(url):
            raw = openai_client(url).chat.completions.with_raw_response.create(
                model="router", messages=easy, max_tokens=1, temperature=0
            )
            return raw.headers

        assert (ask(serve_pair["serve"])["x-router-decision"], ask(serve_pair["serve"])["x-router-ood"]) == (WEAK, "0")
        replicas, asked = set(), 0
        while asked < 16 and len(replicas) < 2:
            asked += 1
            headers = ask(serve_pair["serve"] + "/ood")
            replicas.add(headers["x-router-replica"])
            assert (headers["x-router-ood"], headers["x-router-shadow-would-be"]) == ("1", STRONG)
            assert headers["x-router-model"] == WEAK
        assert len(replicas) == 2, replicas
    finally:
        serve.delete("ood")


# -- one /metrics over the replicas (one named metrics actor holds each replica's latest counts) ----------


def _routed_total(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "difficulty_router_routing_decisions_total"
    )


def _gauge(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return next(f.samples[0].value for f in text_string_to_metric_families(text) if f.name == name)


def test_metrics_of_both_replicas_come_out_of_one_scrape(serve_pair, trained_router, llama_backends, tmp_path):
    """A fresh 2-replica application: requests until both replicas have served some (n in all), then every
    scrape, whichever replica answers it, counts n routing decisions and 2 replicas reporting; a replica
    answering for itself alone would count only its share (fewer than n), so the wait would run out. With the
    metrics actor gone, a scrape still answers (200), with the answering replica's own counts, marked."""
    import time

    import httpx
    from ray import serve

    from difficulty_router.scale.ray_metrics import drop_metrics_board, metrics_board_name

    app = two_more_replicas(trained_router, llama_backends, tmp_path, app_name="metrics")
    serve.run(app, name="metrics", route_prefix="/totals")
    url = serve_pair["serve"] + "/totals"
    try:
        served: dict[str, int] = {}
        while sum(served.values()) < 24 and (len(served) < 2 or sum(served.values()) < 4):
            headers, _ = _ask(url)
            served[headers["x-router-replica"]] = served.get(headers["x-router-replica"], 0) + 1
        assert len(served) == 2, f"every request went to one replica ({served}); the merge was not exercised"
        n = sum(served.values())
        answered_with_n, scrapes, deadline = set(), [], time.monotonic() + 30
        while len(answered_with_n) < 2 and time.monotonic() < deadline:
            response = httpx.get(url + "/metrics")
            assert response.status_code == 200
            replica, total = response.headers["x-router-replica"], _routed_total(response.text)
            scrapes.append((replica, total))
            if total == n and _gauge(response.text, "difficulty_router_replicas_reporting") == 2:
                assert _gauge(response.text, "difficulty_router_metrics_merged") == 1
                assert _gauge(response.text, "difficulty_router_metrics_oldest_snapshot_seconds") < 10
                answered_with_n.add(replica)
            time.sleep(0.1)
        assert answered_with_n == set(served), f"served {served} (n={n}); scrapes (replica, routed): {scrapes[-6:]}"

        assert drop_metrics_board(metrics_board_name("metrics"))
        response = httpx.get(url + "/metrics")
        assert response.status_code == 200
        assert _gauge(response.text, "difficulty_router_metrics_merged") == 0
        assert _gauge(response.text, "difficulty_router_replicas_reporting") == 1
        assert _routed_total(response.text) == served[response.headers["x-router-replica"]]
    finally:
        serve.delete("metrics")
        drop_metrics_board(metrics_board_name("metrics"))
