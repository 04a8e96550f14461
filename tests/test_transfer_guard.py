"""The transfer guard: it must fire when the traffic's read-outs or difficulties leave the training distribution,
stay quiet when they match it, validate its settings, survive save/load, and make a router fall back.

Synthetic read-outs for the statistics (known distributions, so "must fire" and "must not fire" are facts, not
hopes), then the real extractor and the real zero-label ladder for the router's side: real RouteLLM MMLU
prompts as matching traffic, and code snippets, which no MMLU-like training set contains, as shifted traffic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from difficulty_router import DifficultyRouter
from difficulty_router.learning.transfer_guard import (
    DIFFICULTY_LEVELS,
    GUARD_ARRAYS,
    GuardPolicy,
    TransferGuard,
)

D = 24
POLICY = GuardPolicy(window=100, min_queries=50)


def _readouts(rng, n, shift=0.0):
    """Correlated Gaussian read-outs (a few strong directions, like a language model's); ``shift`` moves the
    mean along every feature by that many training standard deviations."""
    basis = np.random.default_rng(123).normal(size=(6, D))
    x = rng.normal(size=(n, 6)) @ basis * 2.0 + rng.normal(size=(n, D))
    return x + shift * 2.5


def _difficulty(x):
    return x[:, :3].sum(1)


@pytest.fixture(scope="module")
def training():
    x = _readouts(np.random.default_rng(0), 1500)
    return x, _difficulty(x)


@pytest.fixture
def guard(training):
    x, d = training
    return TransferGuard.fit(x, d, POLICY, n_components=6)


def test_matching_traffic_never_trips_the_guard(guard):
    x = _readouts(np.random.default_rng(1), 600)
    verdicts = guard.observe(x, _difficulty(x))
    assert [v["state"] for v in verdicts[:49]] == ["warming_up"] * 49
    assert not any(v["fallback"] for v in verdicts)
    assert {v["state"] for v in verdicts[49:]} == {"transfers"}
    assert 35 < verdicts[-1]["median_novelty"] < 65  # out-of-fold calibration: a training-like window sits near 50
    assert 25 < verdicts[-1]["median_difficulty_percentile"] < 75


def test_shifted_readouts_trip_the_guard_and_it_latches(guard):
    x = _readouts(np.random.default_rng(2), 200, shift=1.5)
    verdicts = guard.observe(x, np.zeros(len(x)))  # difficulties like training: only novelty can fire
    assert not any(v["fallback"] for v in verdicts[:49])  # it waits for min_queries
    assert verdicts[49]["fallback"] and verdicts[49]["state"] == "fallback"
    assert "novelty" in verdicts[49]["reason"] and "most capable model" in verdicts[49]["reason"]
    assert all(v["fallback"] for v in verdicts[49:])
    # a latch: training-like traffic afterwards does not switch the head back on ...
    calm = _readouts(np.random.default_rng(3), 300)
    assert all(v["fallback"] for v in guard.observe(calm, _difficulty(calm)))
    # ... until labels arrive and the guard is reset
    guard.reset()
    assert guard.observe(calm[:1], _difficulty(calm[:1]))[0]["state"] == "warming_up"


def test_difficulties_outside_the_training_range_trip_the_guard(guard, training):
    x = _readouts(np.random.default_rng(4), 100)
    hard = np.full(len(x), training[1].max() + 1.0)  # read-outs like training, the head says: all harder than any
    verdicts = guard.observe(x, hard)
    assert verdicts[49]["fallback"] and "extrapolating" in verdicts[49]["reason"]
    assert verdicts[49]["median_difficulty_percentile"] == pytest.approx(100.0)


def test_switched_off_guard_never_falls_back(training):
    x, d = training
    off = TransferGuard.fit(x, d, GuardPolicy(enabled=False, window=100, min_queries=50), n_components=6)
    shifted = _readouts(np.random.default_rng(5), 200, shift=3.0)
    verdicts = off.observe(shifted, _difficulty(shifted))
    assert {v["state"] for v in verdicts} == {"off"} and not any(v["fallback"] for v in verdicts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"window": 0}, "window must be a positive integer"),
        ({"window": 10.5}, "window must be a positive integer"),
        ({"min_queries": True}, "min_queries must be a positive integer"),
        ({"window": 50, "min_queries": 60}, "cannot exceed the window"),
        ({"max_median_novelty": 0}, r"max_median_novelty must lie in \(0, 100\]"),
        ({"max_median_novelty": 101}, r"max_median_novelty must lie in \(0, 100\]"),
        ({"max_median_novelty": float("nan")}, "max_median_novelty must be a finite number"),
        ({"difficulty_range": (60, 40)}, "0 <= low < high <= 100"),
        ({"difficulty_range": (-1, 40)}, "0 <= low < high <= 100"),
        ({"difficulty_range": (5,)}, "two percentiles"),
        ({"difficulty_range": ("a", "b")}, "difficulty_range must be a finite number"),
    ],
)
def test_policy_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuardPolicy(**kwargs)


def test_policy_from_dict_round_trips_and_rejects_unknown_fields():
    policy = GuardPolicy(window=80, min_queries=40, max_median_novelty=90, difficulty_range=(1, 99))
    assert GuardPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert GuardPolicy.from_dict(None) == GuardPolicy()
    with pytest.raises(ValueError, match="unknown fields"):
        GuardPolicy.from_dict({"enabled": True, "threshold": 3})
    with pytest.raises(ValueError, match="must be a JSON object"):
        GuardPolicy.from_dict([1, 2])


def test_guard_rejects_bad_inputs(guard, training):
    x, d = training
    with pytest.raises(ValueError, match="one finite value per training read-out"):
        TransferGuard.fit(x, d[:-1])
    with pytest.raises(ValueError, match="non-decreasing"):
        TransferGuard(guard.novelty, guard.difficulty_quantiles[::-1])
    with pytest.raises(ValueError, match=f"must hold {len(DIFFICULTY_LEVELS)} finite values"):
        TransferGuard(guard.novelty, guard.difficulty_quantiles[:10])
    with pytest.raises(ValueError, match="observe needs"):
        guard.observe(x[:5, :-1], d[:5])
    with pytest.raises(ValueError, match="observe needs"):
        guard.observe(x[:5], d[:4])
    with pytest.raises(ValueError, match="policy must be a GuardPolicy"):
        TransferGuard(guard.novelty, guard.difficulty_quantiles, {"window": 3})


def test_save_load_round_trip_and_tampering(guard, tmp_path):
    guard.save(tmp_path / "g")
    loaded = TransferGuard.load(tmp_path / "g")
    assert loaded.policy == guard.policy
    shifted = _readouts(np.random.default_rng(6), 120, shift=1.5)
    assert guard.observe(shifted, _difficulty(shifted)) == loaded.observe(shifted, _difficulty(shifted))
    arrays = tmp_path / "g" / GUARD_ARRAYS
    data = bytearray(arrays.read_bytes())
    data[-3] ^= 0x01
    arrays.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the hash"):
        TransferGuard.load(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="holds no transfer guard"):
        TransferGuard.load(tmp_path / "missing")


# -- the router's side: the real extractor and the real zero-label ladder ------------------------------------
LADDER = ["cheap", "middle", "strong"]
CODE = [f"def f{i}(xs):\n    return [x ** {i % 5 + 2} for x in xs if x % {i % 7 + 2} == 0]  # {i}" for i in range(80)]


@pytest.fixture(scope="module")
def guarded(extractor, sample_outcomes):
    """The zero-label ladder with a guard whose reference is 160 real MMLU prompts' read-outs (window 60,
    judged from the 40th query)."""
    router = DifficultyRouter.pretrained(LADDER, extractor=extractor)
    reference = sample_outcomes.queries[:160]
    features = router.features(reference, progress=False).features
    difficulty = router.difficulty(router.proba_from(reference, features), features)
    guard = TransferGuard.fit(features, difficulty, GuardPolicy(window=60, min_queries=40), n_components=16)
    return DifficultyRouter(**{**_parts(router), "transfer_guard": guard})


def _parts(router):
    return {
        "extractor": router.extractor,
        "pool": router.pool,
        "probe": router.probe,
        "layers": router.layers,
        "pooling": router.pooling,
        "capability": router.capability,
        "policy": router.policy,
        "difficulty_probe": router.difficulty_probe,
        "info": router.info,
    }


def test_router_keeps_routing_on_matching_traffic_and_falls_back_on_shifted(guarded, sample_outcomes):
    guarded.transfer_guard.reset()
    same = guarded.route_batch(sample_outcomes.queries[160:240], progress=False)
    assert all(d.transfer is not None and not d.transfer["fallback"] for d in same)
    assert same[-1].transfer["state"] == "transfers"
    assert len({d.model for d in same}) >= 2  # the head still routes
    shifted = guarded.route_batch(CODE, progress=False)
    fallen = [d for d in shifted if d.transfer["fallback"]]
    assert fallen, "code snippets must read as unlike the MMLU reference"
    assert all(d.model == "strong" for d in fallen)
    assert "most capable model" in fallen[0].transfer["reason"] and "transfer guard fallback" in str(fallen[0])
    guarded.transfer_guard.reset()


def test_router_with_guard_saves_and_loads(guarded, sample_outcomes, tmp_path):
    guarded.save(tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["transfer_guard"] == guarded.transfer_guard.policy.to_dict()
    loaded = DifficultyRouter.load(tmp_path / "r", extractor=guarded.extractor)
    assert loaded.transfer_guard is not None and loaded.transfer_guard.policy == guarded.transfer_guard.policy
    assert np.array_equal(loaded.transfer_guard.difficulty_quantiles, guarded.transfer_guard.difficulty_quantiles)
    guarded.transfer_guard.reset()
    queries = sample_outcomes.queries[160:220]
    before, after = guarded.route_batch(queries, progress=False), loaded.route_batch(queries, progress=False)
    assert [d.transfer["state"] for d in before] == [d.transfer["state"] for d in after]
    # a manifest that drops the guard while the arrays still hold it is refused
    del manifest["transfer_guard"]
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="disagree on whether the router has a transfer guard"):
        DifficultyRouter.load(tmp_path / "r", extractor=guarded.extractor)
    guarded.transfer_guard.reset()


def test_router_refuses_a_guard_of_another_width(guarded, training):
    x, d = training
    with pytest.raises(ValueError, match="the transfer guard reads 24 features"):
        DifficultyRouter(**{**_parts(guarded), "transfer_guard": TransferGuard.fit(x, d, n_components=6)})


def test_pretrained_ladder_takes_the_guard_saved_next_to_its_head(extractor, tmp_path):
    import shutil

    from difficulty_router.routing.pretrained import PRETRAINED_DIR, DifficultyHead

    head_dir = tmp_path / "head"
    shutil.copytree(PRETRAINED_DIR, head_dir)
    for name in ("transfer_guard.json", GUARD_ARRAYS):  # start from the head alone
        (head_dir / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="holds no transfer guard reference"):
        DifficultyRouter.pretrained(LADDER, extractor=extractor, head=head_dir, transfer_guard=True)
    head = DifficultyHead.load(head_dir)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(80, len(head.weight)))
    TransferGuard.fit(x, head.difficulty(x), GuardPolicy(window=30, min_queries=20), n_components=4).save(head_dir)
    router = DifficultyRouter.pretrained(LADDER, extractor=extractor, head=head_dir, transfer_guard=True)
    guard = router.transfer_guard
    assert guard is not None and guard.policy == GuardPolicy(window=30, min_queries=20)
    # the reference is mapped onto the router's 1-5 difficulty scale, the scale route_batch hands the guard
    assert guard.difficulty_quantiles.min() >= 1.0 and guard.difficulty_quantiles.max() <= 5.0
    off = DifficultyRouter.pretrained(
        LADDER, extractor=extractor, head=head_dir, transfer_guard=GuardPolicy(enabled=False)
    )
    assert off.transfer_guard is not None and not off.transfer_guard.policy.enabled
    assert DifficultyRouter.pretrained(LADDER, extractor=extractor, head=head_dir).transfer_guard is None
    with pytest.raises(ValueError, match="needs the head's directory"):
        DifficultyRouter.pretrained(LADDER, extractor=extractor, head=head, transfer_guard=True)
    with pytest.raises(TypeError, match="transfer_guard must be True, False, None or a GuardPolicy"):
        DifficultyRouter.pretrained(LADDER, extractor=extractor, head=head_dir, transfer_guard="yes")


def test_the_shipped_head_ships_its_guard_reference(extractor):
    router = DifficultyRouter.pretrained(LADDER, extractor=extractor, transfer_guard=True)
    guard = router.transfer_guard
    assert guard is not None and guard.policy == GuardPolicy() and guard.width == 2304
    assert 1.0 <= guard.difficulty_quantiles[0] <= guard.difficulty_quantiles[-1] <= 5.0


def test_decision_log_records_the_guards_verdict(guarded, sample_outcomes, tmp_path):
    """Each logged call carries the verdict its decision had, so a report can tell fallback calls apart; a
    router without a guard logs None."""
    from difficulty_router.routing.decision_log import DecisionLog, read_log

    guarded.transfer_guard.reset()
    log = DecisionLog(tmp_path / "decisions.jsonl")
    queries = sample_outcomes.queries[160:163] + CODE[:1]
    decisions = guarded.route_batch(queries, progress=False)
    for query, decision in zip(queries, decisions, strict=True):
        log.log_call(query, decision, served_by=decision.model, router=guarded)
    unguarded = DifficultyRouter(**_parts(guarded))
    log.log_call(queries[0], unguarded.route(queries[0]), router=unguarded)
    records = list(read_log(tmp_path / "decisions.jsonl"))
    assert [r["transfer"] for r in records[:4]] == [json.loads(json.dumps(d.transfer)) for d in decisions]
    assert all(r["transfer"]["state"] for r in records[:4]) and records[4]["transfer"] is None
    guarded.transfer_guard.reset()


def test_cli_transfer_guard_flag(tmp_path, capsys):
    """``--transfer-guard`` gives the zero-label router the shipped guard (its verdict is in the decision);
    without it there is none; with a saved router it is refused by name, before anything loads."""
    from difficulty_router.cli.main import main

    assert main(["route", "--pretrained", "weak,strong", "--transfer-guard", "--json", "What is 2+2?"]) == 0
    with_guard = json.loads(capsys.readouterr().out)
    assert with_guard["transfer"]["state"] == "warming_up" and with_guard["transfer"]["fallback"] is False
    assert main(["route", "--pretrained", "weak,strong", "--json", "What is 2+2?"]) == 0
    assert json.loads(capsys.readouterr().out)["transfer"] is None
    assert main(["route", "--router", str(tmp_path / "absent"), "--transfer-guard", "What is 2+2?"]) == 2
    assert "--transfer-guard goes with --pretrained" in capsys.readouterr().err
    assert main(["pretrained", "--pool", "weak,strong", "--out", str(tmp_path / "zl"), "--transfer-guard"]) == 0
    saved = DifficultyRouter.load(tmp_path / "zl")
    assert saved.transfer_guard is not None
