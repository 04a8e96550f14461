"""The extractor's hot path (issue 16): work done once is reused, and none of it changes the features.

Real SmolLM2-135M throughout. Speed targets live in benchmarks/overhead.py; these tests check the
behaviour that makes the speed possible: the cached template prefix and length buckets give the
same read-out as a full pass, long prompts are tokenised by their tail only, the numeric path is
chosen by capability, and the read-out sweep prefers the cheapest layer that reads as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difficulty_router import ActivationExtractor, Extraction
from difficulty_router.extraction import numerics
from difficulty_router.extraction.numerics import FEATURE_RTOL, PREFILL_REUSE_ATOL
from difficulty_router.extraction.readout import relative_block_error
from difficulty_router.training.train import select_readout

QUERIES = [
    "What is 2+2?",
    "Explain, step by step, why the harmonic series diverges while the series of 1/n^2 converges.",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    "A train leaves at 3pm going 60 km/h; another at 4pm going 90 km/h. When does the second catch up? " * 3,
]


def _without_prefix(extractor, monkeypatch):
    monkeypatch.setattr(extractor, "prefix_cache", False)
    monkeypatch.setattr(extractor, "prefix", None)


def test_prefix_cache_equals_full_pass(any_dtype_extractor, monkeypatch):
    extractor = any_dtype_extractor
    ids, _ = extractor.tokenize(QUERIES)
    assert extractor.prefix is not None and len(extractor.prefix) >= 10  # SmolLM2's default system prompt
    uses = [extractor._uses_prefix(x) for x in ids]
    assert uses == [True, True, False, True]  # a conversation with its own system message renders differently
    cached = extractor.extract(QUERIES, layers=[0, 1, 15, 30], pooling="both").features
    _without_prefix(extractor, monkeypatch)
    full = extractor.extract(QUERIES, layers=[0, 1, 15, 30], pooling="both").features
    error = relative_block_error(cached, full, extractor.hidden_size)
    assert error.max() <= FEATURE_RTOL[extractor.dtype]


def test_prefixed_prompt_runs_only_its_suffix(extractor):
    seen = []
    handle = extractor._base.embed_tokens.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    try:
        extractor.extract([QUERIES[1]], layers=[3])
    finally:
        handle.remove()
    ids, _ = extractor.tokenize([QUERIES[1]])
    assert seen == [len(ids[0]) - len(extractor.prefix)]


def test_length_buckets_bound_padding_and_cover_every_prompt(extractor, sample_outcomes):
    queries = sample_outcomes.queries[:64]
    ids, _ = extractor.tokenize(queries)
    old = extractor.batch_size
    extractor.batch_size = 32
    try:
        batches = extractor._batches(list(range(len(ids))), ids)
    finally:
        extractor.batch_size = old
    assert sorted(i for batch, _ in batches for i in batch) == list(range(len(ids)))
    for batch, prefixed in batches:
        skip = len(extractor.prefix) if prefixed else 0
        lengths = [len(ids[i]) - skip for i in batch]
        padded = max(lengths) * len(lengths)
        assert len(batch) <= 32 and padded <= max(extractor.max_batch_tokens, max(lengths))
        assert padded - sum(lengths) <= extractor.max_padding * padded
        assert all(extractor._uses_prefix(ids[i]) == prefixed for i in batch)


def test_bucketed_batches_equal_one_by_one(any_dtype_extractor, sample_outcomes):
    extractor = any_dtype_extractor
    queries = sample_outcomes.queries[:12] + QUERIES
    batched = extractor.extract(queries, layers=[15], pooling="both").features
    single = np.vstack([extractor.extract([q], layers=[15], pooling="both").features for q in queries])
    assert relative_block_error(batched, single, extractor.hidden_size).max() <= FEATURE_RTOL[extractor.dtype]


class _CountingTokenizer:
    """The real tokenizer, recording the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, texts, **kwargs):
        self.lengths.extend(len(t) for t in texts)
        return self._tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_long_prompt_is_tokenised_by_its_tail_only(extractor, monkeypatch):
    counting = _CountingTokenizer(extractor.tokenizer)
    monkeypatch.setattr(extractor.prompts, "tokenizer", counting)
    huge = "lorem ipsum dolor sit amet, " * 75_000 + "What is the capital of France?"  # ~2.1 MB
    assert len(huge) > 2_000_000
    ids, truncated = extractor.tokenize([huge])
    assert truncated.tolist() == [True] and len(ids[0]) == extractor.max_tokens
    assert max(counting.lengths) < 100_000  # never the whole 2 MB
    tail = extractor.tokenizer.decode(ids[0][-20:])
    assert tail.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_tail_tokenising_keeps_the_same_ids_as_a_full_pass(extractor, monkeypatch):
    """The ids kept are those of tokenising the whole text and keeping its last max_tokens."""
    monkeypatch.setattr(extractor.prompts, "max_tokens", 64)
    for body in ("filler " * 3000 + "Why?", "ünïcødé 漢字 " * 2000 + "Ok?", "x" * 5_000 + " y" * 10 + "?"):
        text = extractor.render(body)
        full = extractor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, truncated = extractor.tokenize([body])
        assert truncated.tolist() == [True]
        assert ids[0] == full[-64:]
    # One 50,000-character "word" leaves no whitespace to start the tail at: BPE inside it is not local, so
    # only the documented promise holds: max_tokens ids, and the template's end (the read-out) intact.
    text = extractor.render("x" * 50_000)
    full = extractor.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, truncated = extractor.tokenize(["x" * 50_000])
    assert truncated.tolist() == [True] and len(ids[0]) == 64
    assert ids[0][-6:] == full[-6:] and extractor.tokenizer.decode(ids[0][-6:]) == "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("flags, accepted, expected", [
    ({"avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"}, True, torch.bfloat16),  # Sapphire Rapids
    ({"avx512f", "avx512_vnni"}, True, torch.qint8),  # Ice Lake / Zen 4 without bf16, int8 accepted
    ({"avx512f", "avx512_vnni"}, False, torch.float32),  # ... for a model whose int8 was not checked
    ({"avx2", "fma"}, True, torch.float32),  # no int8 dot products
    (set(), True, torch.float32),
])
def test_auto_dtype_follows_capability(monkeypatch, flags, accepted, expected):
    monkeypatch.delenv(numerics.DTYPE_ENV, raising=False)
    monkeypatch.setattr(numerics, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(numerics, "INT8_ACCEPTED", frozenset({"smollm2-135m"} if accepted else ()))
    cpu = torch.device("cpu")
    picks = {numerics.pick_dtype("auto", cpu, "smollm2-135m") for _ in range(3)}
    assert picks == {expected}  # deterministic
    assert numerics.pick_dtype("float32", cpu, "smollm2-135m") == torch.float32  # explicit wins
    with pytest.raises(ValueError, match="CPU-only"):
        numerics.pick_dtype("int8", torch.device("cuda"))


def test_threads_never_exceed_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(numerics, "usable_cores", lambda: 1)
    try:
        assert numerics.match_threads() == 1 and torch.get_num_threads() == 1
        assert numerics.match_threads(2) == 2  # an explicit count wins
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def int8_extractor():
    return ActivationExtractor("smollm2-135m", layers=15, pooling="last", dtype="int8")


def test_int8_path_reads_nearly_the_float32_vector(int8_extractor, extractors_by_dtype):
    assert int8_extractor.dtype == torch.qint8
    linear = [m for m in int8_extractor._blocks[0].modules() if "quantized" in type(m).__module__]
    assert linear, "the decoder blocks' linear layers were not quantised"
    fp32 = extractors_by_dtype["float32"].extract(QUERIES).features
    int8 = int8_extractor.extract(QUERIES).features
    error = relative_block_error(int8, fp32, 576)
    assert 0 < error.max() < 0.3  # really int8 (measured 0.13-0.16 on MMLU prompts), still the same direction
    assert "|int8:" in int8_extractor._cache_key and int8_extractor._cache_key != extractors_by_dtype["float32"]._cache_key


def test_int8_batch_equals_one_by_one(int8_extractor):
    batch = int8_extractor.extract(QUERIES, layers=[15, 30], pooling="both").features
    single = np.vstack([int8_extractor.extract([q], layers=[15, 30], pooling="both").features for q in QUERIES])
    assert relative_block_error(batch, single, 576).max() <= FEATURE_RTOL[torch.qint8]


def _synthetic_sweep(n: int = 600, seed: int = 0):
    """Layers 4 and 8 carry the same success signal (8 a touch cleaner), layer 2 only noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=(n, 2)).astype(float)
    hidden = 8
    blocks = {}
    for layer, strength in ((2, 0.0), (4, 1.0), (8, 1.05)):
        signal = np.zeros((n, hidden))
        signal[:, :2] = strength * (2 * y - 1)
        for pool in ("last", "mean"):
            blocks[(layer, pool)] = signal + rng.normal(size=(n, hidden)) * 1.5
    features = np.concatenate([blocks[(l, p)] for l in (2, 4, 8) for p in ("last", "mean")], axis=1)
    extraction = Extraction(features=features.astype(np.float32), layers=(2, 4, 8), pooling=("last", "mean"),
                            hidden_size=hidden, n_tokens=np.full(n, 10), truncated=np.zeros(n, bool))
    return extraction, y


def test_readout_sweep_prefers_the_shallowest_layer_within_the_best_interval():
    extraction, y = _synthetic_sweep()
    layers, _, table, choice = select_readout(extraction, y)
    assert layers == (4,)
    assert choice["chosen"]["layer"] == 4 and "shallowest" in choice["rule"]
    noise = [row for row in table if row["layer"] == 2]
    assert not any(row["within_best_interval"] for row in noise)
    best_layers, _, _, best_choice = select_readout(extraction, y, prefer_shallow=False)
    assert best_layers == (best_choice["best"]["layer"],)


def test_readout_sweep_respects_a_latency_cap():
    extraction, y = _synthetic_sweep()
    latency = {2: 5.0, 4: 40.0, 8: 20.0}
    layers, _, _, choice = select_readout(extraction, y, latency_ms=latency, max_readout_ms=30.0)
    assert layers == (8,) and "30.0 ms" in choice["rule"]
    layers, _, _, choice = select_readout(extraction, y, latency_ms=latency, max_readout_ms=1.0)
    assert layers == (2,) and choice["cap_met"] is False  # nothing fits: the fastest, and the record says so


def test_training_records_the_readout_choice_and_its_cost(extractor, sample_outcomes, sample_pool):
    from difficulty_router import train_router

    train = sample_outcomes.subset(range(120))
    router = train_router(train, sample_pool, extractor, layers=[0.2, 0.5], families=("activation",), cv=3,
                          progress=False)
    choice = router.info["readout_choice"]
    assert choice["chosen"]["layer"] == router.layers[0]
    assert choice["latency_ms_p50"] > 0 and choice["relative_cost"] == router.layers[0] / extractor.n_layers
    assert {row["layer"] for row in router.info["readout_sweep"]} == {6, 15}


# -- the lean prefill (lean_prefill.py) --------------------------------------------------------------


def test_lean_prefill_is_used_and_equals_the_framework_forward(any_dtype_extractor, sample_outcomes):
    """Padding, the cached prefix, a conversation that cannot use it, every layer kind (embeddings, a
    middle block, the final norm): the lean loop gives the framework's read-out to the dtype's tolerance."""
    extractor = any_dtype_extractor
    assert extractor._lean is not None  # SmolLM2 is a Llama: the lean path passed its start-up check
    queries = [*QUERIES, *sample_outcomes.queries[:12]]
    layers = [0, 1, 9, 15, 30]
    lean = extractor.extract(queries, layers=layers, pooling="both").features
    kept, extractor._lean = extractor._lean, None
    try:
        framework = extractor.extract(queries, layers=layers, pooling="both").features
    finally:
        extractor._lean = kept
    assert relative_block_error(lean, framework, extractor.hidden_size).max() <= FEATURE_RTOL[extractor.dtype]


def test_a_lean_prefill_that_disagrees_is_not_used(monkeypatch, caplog):
    """The start-up check is real: break the rotary step and the extractor falls back, saying so."""
    from difficulty_router.extraction import lean_prefill

    monkeypatch.setattr(lean_prefill, "_rotate", lambda x, cos, sin: x)
    with caplog.at_level("WARNING", logger="difficulty_router.extraction.extractor"):
        broken = ActivationExtractor("smollm2-135m", layers=15, pooling="last")
    assert broken._lean is None
    assert "lean prefill disagreed" in caplog.text


def test_lean_prefill_declines_blocks_that_are_not_llamas(extractor):
    from types import SimpleNamespace

    from difficulty_router.extraction.lean_prefill import LeanPrefill

    config = SimpleNamespace(**{**extractor.model.config.to_dict(), "model_type": "gpt2"})
    assert LeanPrefill.build(extractor._base, extractor._blocks, config, 64, extractor.device) is None
    gelu = SimpleNamespace(**{**extractor.model.config.to_dict(), "hidden_act": "gelu"})
    assert LeanPrefill.build(extractor._base, extractor._blocks, gelu, 64, extractor.device) is None


# -- reuse of the routing prefill by local generation -------------------------------------------------


@pytest.fixture()
def generators(any_dtype_extractor):
    from difficulty_router import LocalGenerator

    extractor = any_dtype_extractor
    reuse = LocalGenerator(extractor, max_new_tokens=8)
    fresh = LocalGenerator(extractor, max_new_tokens=8, reuse_routing_prefill=False)
    yield reuse, fresh
    assert not extractor.holds_prefill  # kept only within a routed call's scope


def greedy_margins(extractor, query, token_ids: list[int]) -> np.ndarray:
    """Per generated step, the fresh full pass's gap (nats) between its best and second-best next token."""
    prompt_ids, _ = extractor.tokenize([query])
    full = torch.tensor([prompt_ids[0] + token_ids])
    with torch.inference_mode():
        logits = extractor.model(full).logits[0].float()
    steps = torch.log_softmax(logits[len(prompt_ids[0]) - 1 : -1], -1)
    top2 = steps.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).numpy()


@pytest.mark.parametrize("query", [QUERIES[1], QUERIES[2]], ids=["cached-prefix", "own-system-message"])
def test_generation_from_the_routing_prefill_equals_a_fresh_prefill(any_dtype_extractor, generators, query):
    """The promise (``numerics.PREFILL_REUSE_ATOL``): the log-probabilities of the tokens both runs chose
    agree within the path's tolerance, and the greedy tokens are the same up to the first step where the
    fresh pass's best two candidates lie within twice that tolerance (a near-tie that rounding may flip;
    in float32 the whole answer is the same)."""
    extractor = any_dtype_extractor
    atol = PREFILL_REUSE_ATOL[extractor.dtype]
    reuse, fresh = generators
    with reuse.reusing_routing_prefill():  # one routed call: its read-out, then its generation
        extractor.extract([query], layers=[9])  # the routing read-out: blocks 1-9 only
        reused = reuse.generate(query)
    assert reuse.reused_prefill  # blocks 10-30 were run from the kept read-out, not the whole prompt again
    again = fresh.generate(query)
    ids = extractor.tokenizer(again.text, add_special_tokens=False)["input_ids"]
    assert [extractor.tokenizer.decode([t]) for t in ids] == again.tokens
    same = 0
    while same < min(len(reused.tokens), len(again.tokens)) and reused.tokens[same] == again.tokens[same]:
        same += 1
    np.testing.assert_allclose(reused.logprobs[:same], again.logprobs[:same], atol=atol)
    if reused.text != again.text:
        assert extractor.dtype != torch.float32, (reused.text, again.text)
        margin = greedy_margins(extractor, query, ids)[same]
        assert margin <= 2 * atol, f"answers part at step {same}, where the fresh pass's margin is {margin:.3f}"
    else:
        assert reused.completion_tokens == again.completion_tokens


def test_prefill_is_reused_only_for_the_prompt_it_read(any_dtype_extractor, generators):
    extractor = any_dtype_extractor
    reuse, _ = generators
    with reuse.reusing_routing_prefill():
        extractor.extract([QUERIES[0]], layers=[9])
        reuse.generate(QUERIES[1])  # another prompt: its own full prefill
        assert not reuse.reused_prefill
        extractor.extract([QUERIES[1]], layers=[9])
        extractor.extract(QUERIES[:2], layers=[9])  # a batch keeps nothing, and drops what was kept
        assert not extractor.holds_prefill
        reuse.generate(QUERIES[1])
        assert not reuse.reused_prefill
        extractor.extract([QUERIES[1]], layers=[9])
        reuse.generate(QUERIES[1])
        assert reuse.reused_prefill
        reuse.generate(QUERIES[1])  # used once
        assert not reuse.reused_prefill
        extractor.extract([QUERIES[1]], layers=[9])
    assert not extractor.holds_prefill  # the call is over: what it did not use is dropped
    extractor.extract([QUERIES[1]], layers=[9])  # outside a routed call's scope nothing is kept
    assert not extractor.holds_prefill
    reuse.generate(QUERIES[1])
    assert not reuse.reused_prefill
