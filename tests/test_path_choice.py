"""``dtype="auto"`` by measurement (issue 30) and the low-memory weight loads behind the half-precision and int8 paths.

Real SmolLM2-135M extractors are timed and compared; the choice is cached in a temporary directory
(the dequantised weights stay in the shared cache). The timings themselves are the machine's, so
the tests check what follows from them (the fastest kept path wins, refusals are recorded and
explained, a cached choice is reused without timing), not any number.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from difficulty_router import ActivationExtractor
from difficulty_router.extraction import numerics, path_choice
from difficulty_router.extraction.model_store import _dequantised_dir
from difficulty_router.extraction.path_choice import choose_path, measuring_enabled, resolve_numeric_path
from difficulty_router.extraction.weight_files import read_header, read_tensor, write_dtype_copy

QUICK = {"PROBE_PROMPTS": 2, "REPEATS": 1}


@pytest.fixture
def quick_measurement(monkeypatch, tmp_path):
    """Two probe prompts, one timed pass, float32 and (emulated where not native) bf16, choices in tmp."""
    for name, value in QUICK.items():
        monkeypatch.setattr(path_choice, name, value)
    monkeypatch.setattr(path_choice, "candidate_paths", lambda: ["float32", "bfloat16"])
    monkeypatch.setattr(path_choice, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(path_choice, "machine_busy", lambda: False)  # the suite may load the machine
    monkeypatch.delenv(numerics.DTYPE_ENV, raising=False)
    monkeypatch.delenv(path_choice.AUTO_ENV, raising=False)
    return tmp_path / "path_choice"


def _expected_winner(trials: dict) -> str:
    """The fastest kept path, unless the CPU's usual path is kept and within 10% of it."""
    kept = [t for t in trials.values() if t.accepted]
    fastest = min(kept, key=lambda t: t.ms_per_100_tokens)
    usual = trials.get(numerics.dtype_name(numerics.pick_dtype("auto", torch.device("cpu"))))
    if usual is not None and usual.accepted and fastest.ms_per_100_tokens >= 0.9 * usual.ms_per_100_tokens:
        return usual.path
    return fastest.path


def _trial(path: str, ms: float, accepted: bool = True) -> path_choice.PathTrial:
    return path_choice.PathTrial(path, ms, 0.0 if accepted else 1.0, "test", accepted, "" if accepted else "far")


def test_the_usual_path_stays_unless_another_is_clearly_faster():
    winner = path_choice._winner
    assert winner([_trial("float32", 100), _trial("bfloat16", 95)], "float32").path == "float32"  # within noise
    assert winner([_trial("float32", 100), _trial("bfloat16", 80)], "float32").path == "bfloat16"
    assert winner([_trial("float32", 100), _trial("bfloat16", 120)], "bfloat16").path == "float32"  # slower
    assert winner([_trial("float32", 100), _trial("bfloat16", 50, accepted=False)], "bfloat16").path == "float32"


def test_a_choice_timed_on_a_busy_machine_is_used_but_not_cached(quick_measurement, monkeypatch, extractor, caplog):
    monkeypatch.setattr(path_choice, "machine_busy", lambda: True)
    choice = choose_path(_build(), extractor.model_hash, 15, "last", 2048, quick_measurement)
    assert choice.path in ("float32", "bfloat16") and not list(quick_measurement.glob("*.json"))
    assert "not cached" in caplog.text


def _build():
    return functools.partial(ActivationExtractor, "smollm2-135m", layers=15, pooling="last")


def test_auto_measures_once_and_picks_the_fastest_path_that_keeps_the_readout(quick_measurement, extractor):
    first = ActivationExtractor("smollm2-135m", layers=15, pooling="last")
    choice = first.numeric_path.choice
    assert choice is not None and not choice.from_cache
    trials = {trial.path: trial for trial in choice.trials}
    assert set(trials) == {"float32", "bfloat16"} and trials["float32"].error == 0.0
    assert 0 < trials["bfloat16"].error <= path_choice.READOUT_RTOL  # really bf16, close to float32
    assert choice.path == _expected_winner(trials) and first.dtype == choice.dtype
    assert first.numeric_path.describe()["trials"][0]["path"] == "float32"
    [written] = quick_measurement.glob("*.json")
    assert json.loads(written.read_text())["path"] == choice.path  # plain JSON, no pickle

    def must_not_time(**_):
        raise AssertionError("a cached choice was measured again")

    again = choose_path(must_not_time, extractor.model_hash, 15, "last", 2048, quick_measurement)
    assert again.from_cache and again.path == choice.path and "(cached)" in again.describe()["how"]


def test_a_path_whose_readout_moves_too_far_is_refused_however_fast(quick_measurement, monkeypatch, extractor):
    monkeypatch.setattr(path_choice, "READOUT_RTOL", 0.0)  # any rounding difference is too far
    choice = choose_path(_build(), extractor.model_hash, 15, "last", 2048, quick_measurement)
    refused = {trial.path: trial for trial in choice.trials if not trial.accepted}
    assert choice.path == "float32" and set(refused) == {"bfloat16"}
    assert "from float32's" in refused["bfloat16"].reason and "refused" in choice.summary()


def test_a_saved_router_judges_the_paths_by_its_own_probabilities(quick_measurement, trained_router, tmp_path):
    from difficulty_router import DifficultyRouter

    trained_router.save(tmp_path / "router")
    loaded = DifficultyRouter.load(tmp_path / "router")
    choice = loaded.extractor.numeric_path.choice
    assert choice is not None and not choice.from_cache
    for trial in choice.trials:
        assert trial.criterion == "router P(success), absolute"
        assert trial.accepted == (trial.error <= 0.05)
    bf16 = next(t for t in choice.trials if t.path == "bfloat16")
    assert 0 < bf16.error < 0.5  # probabilities, really moved by bf16's rounding
    assert choice.path == _expected_winner({t.path: t for t in choice.trials})
    bare = ActivationExtractor("smollm2-135m", layers=loaded.layers, pooling=loaded.pooling)
    assert bare.numeric_path.choice.trials[1].criterion == "read-out relative L2"
    assert len(list(quick_measurement.glob("*.json"))) == 2  # the router's choice is its own, cached apart


def test_a_router_quality_bound_of_zero_keeps_only_float32(quick_measurement, trained_router, extractor):
    quality = path_choice.ReadoutQuality(name="strict", score=trained_router.probe.predict_proba, tolerance=0.0)
    choice = choose_path(_build(), extractor.model_hash, 15, "last", 2048, quick_measurement, quality)
    assert choice.path == "float32"
    assert "router P(success)" in next(t for t in choice.trials if t.path == "bfloat16").reason


def test_an_unreadable_cached_choice_is_measured_again(quick_measurement, extractor):
    quick_measurement.mkdir(parents=True)
    key = path_choice._key(extractor.model_hash, 15, "last", 2048)
    (quick_measurement / f"{key}.json").write_text('{"path": "int8", "trials": "not a list"}')
    choice = choose_path(_build(), extractor.model_hash, 15, "last", 2048, quick_measurement)
    assert not choice.from_cache and choice.path in ("float32", "bfloat16")


def test_a_pinned_or_explicit_path_is_never_measured(monkeypatch, extractor):
    def must_not_build(**_):
        raise AssertionError("measured")

    cpu = torch.device("cpu")
    monkeypatch.setenv(numerics.DTYPE_ENV, "bfloat16")
    pinned = resolve_numeric_path("auto", cpu, extractor.source, must_not_build, (15, "last", 2048))
    assert pinned.dtype == torch.bfloat16 and "DIFFICULTY_ROUTER_DTYPE" in pinned.how
    asked = resolve_numeric_path("float32", cpu, extractor.source, must_not_build, (15, "last", 2048))
    assert asked.dtype == torch.float32 and asked.how == "asked for" and asked.choice is None
    monkeypatch.delenv(numerics.DTYPE_ENV)
    monkeypatch.setenv(path_choice.AUTO_ENV, "capability")
    by_flags = resolve_numeric_path("auto", cpu, extractor.source, must_not_build, (15, "last", 2048))
    assert by_flags.dtype == numerics.pick_dtype("auto", cpu) and "capability" in by_flags.how


def test_measuring_mode_is_validated(monkeypatch):
    monkeypatch.setenv(path_choice.AUTO_ENV, "fastest")
    with pytest.raises(ValueError, match="DIFFICULTY_ROUTER_AUTO='fastest' is not a mode"):
        measuring_enabled(torch.device("cpu"))
    monkeypatch.setenv(path_choice.AUTO_ENV, "measure")
    assert measuring_enabled(torch.device("cpu")) and not measuring_enabled(torch.device("meta"))


def test_bf16_weights_copy_holds_exactly_the_rounded_float32_weights(extractor, tmp_path):
    source = _dequantised_dir(extractor.source, extractor.model_hash)
    target = tmp_path / "copy"
    write_dtype_copy(source, target, torch.bfloat16)
    header, start = read_header(source / "model.safetensors")
    with safe_open(str(target / "model.safetensors"), framework="pt") as copy:
        assert set(copy.keys()) == set(header)
        for name in list(header)[:12]:
            original = read_tensor(source / "model.safetensors", name, header, start)
            assert copy.get_tensor(name).dtype == torch.bfloat16
            assert torch.equal(copy.get_tensor(name), original.to(torch.bfloat16)), name
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    assert (target / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="no weights copy"):
        write_dtype_copy(source, tmp_path / "int8", torch.qint8)


def test_int8_quantised_from_the_file_equals_int8_quantised_from_the_loaded_weights(monkeypatch):
    from difficulty_router.extraction import extractor as extractor_module

    queries = ["What is the capital of France?", "Solve 3x + 5 = 20 for x, showing each step."]
    from_file = ActivationExtractor("smollm2-135m", layers=15, dtype="int8").extract(queries).features
    monkeypatch.setattr(extractor_module, "block_weights_from_file", lambda model, blocks: None)
    from_module = ActivationExtractor("smollm2-135m", layers=15, dtype="int8").extract(queries).features
    np.testing.assert_array_equal(from_file, from_module)


def test_processes_of_one_job_resolve_auto_by_capability_without_timing(monkeypatch):
    """Ray workers and Serve replicas: each timing the paths would let them choose differently."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(numerics.DTYPE_ENV, raising=False)
    monkeypatch.setattr(numerics, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert numerics.one_path_for_many_processes("auto", cpu) == "bfloat16"
    monkeypatch.setattr(numerics, "cpu_flags", lambda: frozenset({"avx2"}))
    assert numerics.one_path_for_many_processes("auto", cpu) == "float32"
    assert numerics.one_path_for_many_processes("int8", cpu) == "int8"  # an explicit path is kept
    monkeypatch.setenv(numerics.DTYPE_ENV, "bfloat16")
    assert numerics.one_path_for_many_processes("auto", cpu) == "auto"  # the pin applies in every process
