"""The activation extractor on the real embedded model (SmolLM2-135M-Instruct, GGUF from PyPI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difficulty_router import ActivationExtractor, FeatureCache
from difficulty_router.extraction.numerics import FEATURE_RTOL
from difficulty_router.extraction.readout import normalise_layers, relative_block_error

QUERIES = [
    "What is 2+2?",
    "Explain, step by step, why the harmonic series diverges while the series of 1/n^2 converges.",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
]


def assert_same_readout(got, expected, extractor):
    """The promise of ``FEATURE_RTOL`` for this extractor's dtype, block by block."""
    got, expected = np.atleast_2d(got), np.atleast_2d(expected)
    error = relative_block_error(got, expected, extractor.hidden_size)
    assert error.max() <= FEATURE_RTOL[extractor.dtype], (
        f"{extractor.dtype}: relative block error {error.max():.2e} > {FEATURE_RTOL[extractor.dtype]:.0e}")


def full_pass_hidden(extractor, ids):
    """Reference read-out: a full forward pass of the whole CausalLM with output_hidden_states, one prompt, no padding."""
    with torch.inference_mode():
        out = extractor.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return [h[0].float().numpy() for h in out.hidden_states]


def test_shapes_and_recorded_readout(extractor):
    result = extractor.extract(QUERIES, layers=[0.5, -1], pooling="both")
    assert result.shape == (3, 4 * extractor.hidden_size)
    assert result.features.dtype == np.float32
    assert result.layers == (15, 30)
    assert result.pooling == ("last", "mean")
    assert result.model_id == "smollm2-135m" and len(result.model_hash) == 64
    assert np.asarray(result).shape == result.shape
    assert not result.any_truncated


def test_deterministic(extractor):
    a = extractor.extract(QUERIES).features
    b = extractor.extract(QUERIES).features
    assert np.array_equal(a, b)


@pytest.mark.parametrize("layer", [0, 1, 15, 29, 30])
def test_early_exit_equals_full_forward(any_dtype_extractor, layer):
    extractor = any_dtype_extractor
    ids, _ = extractor.tokenize([QUERIES[1]])
    reference = full_pass_hidden(extractor, ids[0])[layer]
    got = extractor.extract([QUERIES[1]], layers=[layer], pooling="both").features[0]
    assert_same_readout(got, np.concatenate([reference[-1], reference.mean(0)]), extractor)
    if extractor.dtype == torch.float32:  # one prompt, no padding: float32 is exact to rounding (the cached
        # template prefix runs as its own matmul, so sums split differently: measured <= 1.5e-6 x the largest entry)
        last, mean = got[: extractor.hidden_size], got[extractor.hidden_size :]
        np.testing.assert_allclose(last, reference[-1], rtol=1e-5, atol=4e-6 * np.abs(reference[-1]).max())
        np.testing.assert_allclose(mean, reference.mean(0), rtol=1e-5, atol=1e-4)


def test_early_exit_runs_no_later_layer(extractor):
    # Each block's down projection runs in both the lean loop and the framework's forward.
    calls = []
    handles = [
        block.mlp.down_proj.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, block in enumerate(extractor._blocks)
    ]
    try:
        extractor.extract(["hello"], layers=[10])
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(10))


def test_readout_position_is_end_of_generation_prompt(any_dtype_extractor):
    extractor = any_dtype_extractor
    text = extractor.render([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n")
    ids, _ = extractor.tokenize(["Hi"])
    expected = extractor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == expected
    reference = full_pass_hidden(extractor, expected)[15]
    got = extractor.extract(["Hi"], layers=[15], pooling="last").features[0]
    assert_same_readout(got, reference[-1], extractor)


def test_conversation_is_read_whole(extractor):
    history = [
        {"role": "system", "content": "You are a lawyer."},
        {"role": "user", "content": "Can I sue?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"tort\"}"}}]},
        {"role": "tool", "content": "Tort law applies."},
        {"role": "user", "content": "So?"},
    ]
    text = extractor.render(history)
    for piece in ("You are a lawyer.", "Can I sue?", "lookup", "Tort law applies.", "So?"):
        assert piece in text
    short = extractor.extract([[{"role": "user", "content": "So?"}]]).features
    full = extractor.extract([history]).features
    assert not np.allclose(short, full)


def test_batch_equals_one_by_one(any_dtype_extractor):
    """Padding a prompt beside longer ones changes its read-out only within the dtype's promise."""
    extractor = any_dtype_extractor
    batch = extractor.extract(QUERIES, layers=[15, 30], pooling="both").features
    single = np.vstack([extractor.extract([q], layers=[15, 30], pooling="both").features for q in QUERIES])
    assert_same_readout(batch, single, extractor)
    cosine = (batch * single).sum(1) / np.linalg.norm(batch, axis=1) / np.linalg.norm(single, axis=1)
    assert cosine.min() > 0.9999
    if extractor.dtype == torch.float32:
        np.testing.assert_allclose(batch, single, rtol=1e-4, atol=2e-4)


def test_dtypes_read_the_same_direction(extractors_by_dtype):
    """A router trained on float32 features is served by bf16 on CPUs with native bf16: the two
    paths must read nearly the same vector (measured: relative error 1e-2 to 1.8e-2 at layer 15)."""
    fp32 = extractors_by_dtype["float32"].extract(QUERIES).features
    bf16 = extractors_by_dtype["bfloat16"].extract(QUERIES).features
    error = relative_block_error(bf16, fp32, extractors_by_dtype["float32"].hidden_size)
    assert error.max() < 0.1
    assert not np.array_equal(fp32, bf16)  # the bf16 path really ran in bf16


def test_truncation_keeps_last_tokens(any_dtype_extractor):
    extractor = any_dtype_extractor
    long_query = "filler " * 300 + "What is the capital of France?"
    old = extractor.max_tokens
    extractor.max_tokens = 32
    try:
        result = extractor.extract([long_query, "short"], layers=[15])
        ids, truncated = extractor.tokenize([long_query])
    finally:
        extractor.max_tokens = old
    assert result.truncated.tolist() == [True, False]
    assert result.n_tokens[0] == 32
    full_ids, _ = extractor.tokenize([long_query])
    assert ids[0] == full_ids[0][-32:]
    assert "France" in extractor.tokenizer.decode(ids[0])
    reference = full_pass_hidden(extractor, ids[0])[15][-1]
    assert_same_readout(result.features[0], reference, extractor)


def test_select_slices_without_recomputing(extractor):
    both = extractor.extract(QUERIES, layers=[10, 15], pooling="both")
    sub = both.select(layers=[15], pooling="mean")
    direct = extractor.extract(QUERIES, layers=[15], pooling="mean")
    np.testing.assert_allclose(sub.features, direct.features, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer 20 was not extracted"):
        both.select(layers=[20])


def test_feature_cache_serves_second_run(extractor, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    monkeypatch.setattr(extractor, "feature_cache", cache)
    first = extractor.extract(QUERIES, layers=[10, 15], pooling="both").features

    def no_forward(*_a, **_k):
        raise AssertionError("forward pass ran although every row was cached")

    monkeypatch.setattr(extractor, "_forward", no_forward)
    second = extractor.extract(QUERIES, layers=[10, 15], pooling="both").features
    assert np.array_equal(first, second)
    # blocks are cached one by one, so a subset of the read-out is served too
    mean_only = extractor.extract(QUERIES, layers=[15], pooling="mean").features
    assert np.array_equal(mean_only, first[:, 3 * 576 :])


def test_feature_cache_keeps_dtypes_apart(extractors_by_dtype, tmp_path, monkeypatch):
    """A bf16 extractor sharing a cache directory with a float32 one never gets float32 rows (and back)."""
    cache = FeatureCache(tmp_path)
    fp32, bf16 = extractors_by_dtype["float32"], extractors_by_dtype["bfloat16"]
    monkeypatch.setattr(fp32, "feature_cache", cache)
    monkeypatch.setattr(bf16, "feature_cache", cache)
    from_fp32 = fp32.extract(QUERIES).features
    from_bf16 = bf16.extract(QUERIES).features
    assert not np.array_equal(from_fp32, from_bf16)  # computed in bf16, not read from the float32 rows
    assert np.array_equal(fp32.extract(QUERIES).features, from_fp32)
    assert np.array_equal(bf16.extract(QUERIES).features, from_bf16)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([""], "empty string"),
        ([None], "is None"),
        ([42], "type int"),
        ([[]], "empty conversation"),
        ([[{"role": "wizard", "content": "x"}]], "unknown role 'wizard'"),
        ([[{"content": "x"}]], "no 'role'"),
        ("just a string", "single string"),
        ([], "empty list"),
    ],
)
def test_bad_queries_are_named(extractor, bad, message):
    with pytest.raises(ValueError, match=message):
        extractor.extract(bad)


def test_layer_out_of_range(extractor):
    with pytest.raises(ValueError, match="layer 31 is out of range"):
        extractor.extract(["x"], layers=[31])
    with pytest.raises(ValueError, match="fraction"):
        normalise_layers(1.5, 30)
    with pytest.raises(ValueError, match="unknown pooling"):
        extractor.extract(["x"], pooling="max")


def test_missing_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        ActivationExtractor(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        ActivationExtractor(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model path not found"):
        ActivationExtractor("./no/such/dir")


def test_layer_spec_normalisation():
    assert normalise_layers([0.5, -1, 3], 30) == (15, 30, 3)
    assert normalise_layers(-31, 30) == (0,)
    with pytest.raises(ValueError, match="not an int index"):
        normalise_layers(["7"], 30)


def test_concurrent_extractions_do_not_mix(any_dtype_extractor):
    """Hooks live on the shared model; two threads must each get their own read-out."""
    from concurrent.futures import ThreadPoolExecutor

    extractor = any_dtype_extractor
    expected = [extractor.extract([q]).features for q in QUERIES]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda q: extractor.extract([q]).features, QUERIES * 2))
    for i, features in enumerate(got):
        assert_same_readout(features, expected[i % 3], extractor)
        others = [expected[j] for j in range(3) if j != i % 3]
        assert all(relative_block_error(features, o, extractor.hidden_size).max() > 0.1 for o in others)


def test_dtype_env_variable_sets_auto(monkeypatch):
    from difficulty_router.extraction.numerics import DTYPE_ENV, pick_dtype

    cpu = torch.device("cpu")
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert pick_dtype("auto", cpu) == torch.bfloat16
    assert pick_dtype("float32", cpu) == torch.float32  # an explicit dtype wins
    monkeypatch.setenv(DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="DIFFICULTY_ROUTER_DTYPE='fp8' is not a dtype"):
        pick_dtype("auto", cpu)
