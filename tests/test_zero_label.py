"""Routing without labels: the shipped difficulty head, the zero-label ladder router, calibration on unlabelled prompts.

Real pieces throughout: the shipped head (hash-checked), the real SmolLM2 extractor, real
RouteLLM MMLU prompts from the shipped sample (RouteLLM is never in the head's training
data, so these are held-out queries), a real trained router, real files for the CLI and real
llama.cpp backends behind LangChain's ChatOpenAI for the adapter check.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from difficulty_router import DifficultyRouter, ModelPool, PoolModel
from difficulty_router.cli.main import main
from difficulty_router.routing.pretrained import PRETRAINED_DIR, DifficultyHead, ladder_difficulty

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
LADDER = ["cheap", "middle", "strong"]


@pytest.fixture(scope="module", autouse=True)
def _feature_cache(extractor, tmp_path_factory):
    """The tests route the same prompts many times: a real on-disk feature cache for this module only."""
    from difficulty_router import FeatureCache

    before = extractor.feature_cache
    extractor.feature_cache = FeatureCache(tmp_path_factory.mktemp("features"))
    yield
    extractor.feature_cache = before


@pytest.fixture(scope="module")
def prompts(sample_outcomes):
    """400 real RouteLLM MMLU prompts (none of RouteLLM is in the head's training data)."""
    return sample_outcomes.subset(range(400))


@pytest.fixture(scope="module")
def ladder(extractor):
    return DifficultyRouter.pretrained(LADDER, extractor=extractor)


def test_shipped_head_loads_with_its_hash_checked(tmp_path):
    head = DifficultyHead.load()
    assert head.extractor["model_id"] == "smollm2-135m" and head.discrimination > 0
    assert "RouteLLM" in head.info["excluded"]
    copy = tmp_path / "head"
    shutil.copytree(PRETRAINED_DIR, copy)
    arrays = copy / "difficulty_head.safetensors"
    data = bytearray(arrays.read_bytes())
    data[-5] ^= 0x01  # one flipped bit inside the weights
    arrays.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the hash"):
        DifficultyHead.load(copy)


def test_pretrained_ladder_sends_harder_queries_up(ladder, prompts):
    decisions = ladder.route_batch(prompts.queries[:200], progress=False)
    # even shares are set on the head's training queries; MMLU reads harder than most of them, so the
    # cheap rung may get little of it (calibrate on your own prompts fixes the shares, tested below)
    assert len({d.model for d in decisions}) >= 2
    for d in decisions:
        p = [d.probabilities[m] for m in LADDER]
        assert p[0] <= p[1] <= p[2]  # IRT curves: a higher rung is never less likely to succeed
        # the threshold policy at 1/2: the cheapest rung whose IRT curve is at least one half
        assert d.model == next((m for m, q in zip(LADDER, p, strict=True) if q >= 0.5), LADDER[-1])
        assert 1 <= d.difficulty_level <= 5
    rank = {m: i for i, m in enumerate(LADDER)}
    difficulty = np.array([d.difficulty for d in decisions])
    rungs = np.array([rank[d.model] for d in decisions])
    used = sorted(set(rungs.tolist()))
    for lower, upper in zip(used, used[1:], strict=False):  # every query on a higher rung reads harder
        assert difficulty[rungs == lower].max() <= difficulty[rungs == upper].min() + 1e-9


def test_pretrained_difficulty_predicts_failures_on_held_out_mmlu(extractor, prompts):
    """Zero labels from RouteLLM, yet the head's difficulty ranks the weak model's failures above its
    successes (the benchmark measures 0.6+ APGR on 6,000 rows; 400 rows give a noisier AUROC)."""
    router = DifficultyRouter.pretrained([WEAK, STRONG], extractor=extractor)
    features = router.features(prompts.queries, progress=False).features
    difficulty = ladder_difficulty(router, features)
    weak_failed = prompts.scores[:, prompts.models.index(WEAK)] < 0.5
    assert roc_auc_score(weak_failed, difficulty) > 0.55


def test_pretrained_router_saves_and_loads_like_a_trained_one(ladder, prompts, tmp_path):
    ladder.save(tmp_path / "r")
    loaded = DifficultyRouter.load(tmp_path / "r", extractor=ladder.extractor)
    queries = prompts.queries[:20]
    before, after = ladder.route_batch(queries, progress=False), loaded.route_batch(queries, progress=False)
    assert [d.model for d in before] == [d.model for d in after]
    assert np.allclose([d.probabilities["middle"] for d in before], [d.probabilities["middle"] for d in after])


def test_pretrained_pool_with_prices_must_be_cheapest_first(extractor):
    pool = ModelPool((PoolModel("dear", cost_per_query=2.0), PoolModel("cheap", cost_per_query=1.0)))
    with pytest.raises(ValueError, match="cheapest to most capable"):
        DifficultyRouter.pretrained(pool, extractor=extractor)
    with pytest.raises(ValueError, match="at least two models"):
        DifficultyRouter.pretrained(["only"], extractor=extractor)
    with pytest.raises(ValueError, match="sum to 1"):
        DifficultyRouter.pretrained(LADDER, shares=[0.5, 0.2, 0.2], extractor=extractor)


# -- calibration on unlabelled prompts -----------------------------------------------------
def _share(router, queries, model) -> float:
    return float(np.mean([d.model == model for d in router.route_batch(queries, progress=False)]))


def test_calibrate_ladder_to_a_strong_share(extractor, prompts):
    router = DifficultyRouter.pretrained(LADDER, extractor=extractor)
    calib, held_out = prompts.queries[:200], prompts.queries[200:400]
    report = router.calibrate(unlabelled=calib, strong_share=0.3)
    assert report["strong_model"] == "strong"
    assert abs(report["strong_share"] - 0.3) <= 1 / len(calib) + 1e-9  # met exactly on the prompts (up to ties)
    assert abs(_share(router, calib, "strong") - 0.3) <= 1 / len(calib) + 1e-9
    # new prompts of the same kind: within the sampling error of a share of 0.3 over 200 queries (~3.5 sd)
    assert abs(_share(router, held_out, "strong") - 0.3) < 3.5 * np.sqrt(0.3 * 0.7 / 200) * np.sqrt(2)
    router.calibrate(unlabelled=calib, shares=[0.6, 0.3, 0.1])
    assert [round(report_share, 2) for report_share in router.calibrate(
        unlabelled=calib, shares=[0.6, 0.3, 0.1])["shares"].values()] == [0.6, 0.3, 0.1]


def test_calibrate_trained_router_to_a_strong_share(trained_router, prompts, monkeypatch):
    monkeypatch.setattr(trained_router, "policy", trained_router.policy)
    calib = prompts.queries[240:400]  # rows the session router did not train on
    report = trained_router.calibrate(unlabelled=calib, strong_share=0.4)
    assert report["strong_model"] == STRONG
    assert abs(_share(trained_router, calib, STRONG) - 0.4) <= 0.02
    assert report["strong_share"] == pytest.approx(_share(trained_router, calib, STRONG))


def test_calibrate_to_a_budget_per_1k(trained_router, prompts, monkeypatch):
    monkeypatch.setattr(trained_router, "policy", trained_router.policy)
    calib = prompts.queries[240:400]
    costs = trained_router.pool.costs([len(q[0]["content"]) for q in calib])  # one-message conversations
    cheapest, dearest = 1000 * costs.min(axis=1).mean(), 1000 * costs.max(axis=1).mean()
    budget = cheapest + 0.5 * (dearest - cheapest)
    report = trained_router.calibrate(unlabelled=calib, max_cost_per_1k=budget)
    assert report["cost_per_1k"] <= budget
    assert 0 < report["strong_share"] < 1
    with pytest.raises(ValueError, match="below the cheapest routing"):
        trained_router.calibrate(unlabelled=calib, max_cost_per_1k=cheapest / 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strong_share": 1.5}, "strong_share must be a number in"),
        ({"strong_share": -0.1}, "strong_share must be a number in"),
        ({"strong_share": 0.3, "max_cost_per_1k": 1.0}, "exactly one of"),
        ({}, "exactly one of"),
        ({"max_cost_per_1k": float("nan")}, "finite non-negative"),
    ],
)
def test_calibrate_rejects_bad_targets(ladder, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ladder.calibrate(unlabelled=prompts.queries[:30], **kwargs)


def test_calibrate_rejects_too_few_prompts(ladder):
    with pytest.raises(ValueError, match="at least 20 unlabelled prompts, got 0"):
        ladder.calibrate(unlabelled=[], strong_share=0.3)
    with pytest.raises(TypeError, match="list of prompts"):
        ladder.calibrate(unlabelled="one prompt", strong_share=0.3)


# -- CLI -------------------------------------------------------------------------------------
def test_cli_pretrained_route_and_calibrate(tmp_path, prompts, capsys):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts.queries[:120]))
    assert main(["pretrained", "--pool", f"{WEAK},{STRONG}", "--out", str(tmp_path / "r")]) == 0
    assert main(["route", "--pretrained", f"{WEAK},{STRONG}", "--json", "What is 2+2?"]) == 0
    out = capsys.readouterr().out
    decision = json.loads(out[out.index("{"):])
    assert set(decision["probabilities"]) == {WEAK, STRONG}
    assert main(["calibrate", str(tmp_path / "r"), "--unlabelled", str(tmp_path / "prompts.jsonl"),
                 "--strong-share", "0.25", "--no-progress"]) == 0
    assert "gets 25.0% of calls" in capsys.readouterr().out
    saved = DifficultyRouter.load(tmp_path / "r")
    assert saved.info["calibration"]["unlabelled"]["strong_share"] == pytest.approx(0.25, abs=1 / 120)
    assert saved.info["zero_label"]["shares"] == pytest.approx([0.75, 0.25])


def test_cli_calibrate_reports_bad_input(tmp_path, capsys):
    assert main(["pretrained", "--pool", "a,b", "--out", str(tmp_path / "r")]) == 0
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["calibrate", str(tmp_path / "r"), "--unlabelled", str(tmp_path / "empty.jsonl"),
                 "--strong-share", "0.3"]) == 2
    assert "holds no queries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(tmp_path / "r"), "--unlabelled", str(tmp_path / "empty.jsonl"), "--strong-share", "2"])
    assert "a share must lie in [0, 1]" in capsys.readouterr().err
    assert main(["route", "--json", "hi"]) == 2
    assert "give --router DIR or --pretrained POOL" in capsys.readouterr().err


# -- adapters ----------------------------------------------------------------------------------
def test_pretrained_router_drives_the_langchain_adapter(extractor, llama_backends):
    from langchain_openai import ChatOpenAI

    from langchain_difficulty_router import ChatDifficultyRouter

    router = DifficultyRouter.pretrained([WEAK, STRONG], extractor=extractor, shares=[0.0, 1.0])
    models = {name: ChatOpenAI(base_url=llama_backends[alias], api_key="none", model=alias, temperature=0,
                               max_retries=0, extra_body={"max_tokens": 4})
              for name, alias in ((WEAK, "small"), (STRONG, "large"))}
    chat = ChatDifficultyRouter(router=router, models=models)
    message = chat.invoke("Name a colour.")
    record = message.response_metadata["difficulty_router"]
    assert record["served_by"] == STRONG  # share 1.0 for the strong rung: everything goes up
    assert set(record["decision"]["probabilities"]) == {WEAK, STRONG}
    assert record["decision"]["probabilities"][STRONG] >= 0.5 > record["decision"]["probabilities"][WEAK]


def test_serve_pretrained_builds_the_router_for_the_served_pool(tmp_path):
    from difficulty_router.cli.main import build_parser
    from difficulty_router.cli.serve import with_pretrained_router

    pool = {"models": [{"name": "a", "cost_per_query": 1.0, "base_url": "http://127.0.0.1:9/v1"},
                       {"name": "b", "cost_per_query": 2.0, "base_url": "http://127.0.0.1:9/v1"}]}
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    args = build_parser().parse_args(["serve", "--pretrained", "--pool", str(tmp_path / "pool.json")])
    routers = with_pretrained_router(args, {})
    assert list(routers) == ["router"] and routers["router"].models == ["a", "b"]
    assert routers["router"].info["zero_label"]["costing"] == "prices"
    with pytest.raises(ValueError, match="served as 'router'"):
        with_pretrained_router(args, {"router": routers["router"]})
