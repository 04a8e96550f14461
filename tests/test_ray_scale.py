"""Scale-out on a real local Ray cluster (2 CPUs on loopback, started once for the module).

Distributed extraction must give the single-process features (float32 tolerance), share the feature
cache with single-process extraction, and lose or duplicate no row when a worker dies mid-job.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install 'difficulty-router[ray]'")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from difficulty_router import ActivationExtractor  # noqa: E402
from difficulty_router.extractor import relative_block_error  # noqa: E402
from difficulty_router.feature_cache import FeatureCache  # noqa: E402
from difficulty_router.numerics import FEATURE_RTOL  # noqa: E402
from difficulty_router.scale.ray_extract import extract_distributed  # noqa: E402
from difficulty_router.scale.shards import FeatureShards  # noqa: E402

N_PROMPTS = 200
#: A shallow read-out of short prompts keeps ~200 forward passes quick on 2 shared cores.
READOUT = {"layers": 0.3, "max_tokens": 64, "dtype": "float32"}


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


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


def test_distributed_features_equal_single_process(distributed, reference):
    keys, features = reference
    _assert_exactly_once(distributed, keys)
    assert distributed.manifest["workers"] == 2 and len(distributed.shards) == N_PROMPTS // 50
    got = distributed.lookup(keys)
    error = relative_block_error(got, features, distributed.manifest["hidden_size"])
    assert error.max() <= FEATURE_RTOL[torch.float32], error.max()


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


def test_a_worker_killed_mid_job_loses_and_duplicates_no_row(
    ray_cluster, distributed, prompts_jsonl, reference, cache_dir, tmp_path
):
    """The worker that meets the marked prompt writes its shard, then its process exits (as on a lost
    machine). Ray restarts the actor and retries the batch; the result holds every row exactly once and
    agrees with single-process extraction."""
    keys, features = reference
    marker = tmp_path / "crashed"
    marked = json.loads(prompts_jsonl.read_text().splitlines()[123])["messages"]
    shards = extract_distributed(
        prompts_jsonl,
        tmp_path / "out",
        workers=2,
        rows_per_shard=25,
        feature_cache=cache_dir,  # the retried batch is served from the cache: quick, and still exactly once
        pooling="last",
        _crash_once=(str(marker), marked),
        **READOUT,
    )
    assert marker.exists(), "the fault was not injected"
    _assert_exactly_once(shards, keys)
    error = relative_block_error(shards.lookup(keys), features, shards.manifest["hidden_size"])
    assert error.max() <= FEATURE_RTOL[torch.float32]


def test_bad_input_is_refused_with_a_clear_error(ray_cluster, tmp_path):
    bad = tmp_path / "prompts.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"expected \.jsonl, \.json, \.txt or \.parquet"):
        extract_distributed(bad, tmp_path / "out")
    no_column = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text_only": ["hi"]}), no_column)
    with pytest.raises(ValueError, match="needs a column named one of"):
        extract_distributed(no_column, tmp_path / "out2")
