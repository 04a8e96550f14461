"""Feature families: the lexical read-out, the stack, and their choice by cross-validation.

Routers are trained with the real embedded extractor on real RouteLLM MMLU rows; the
selection tests use synthetic sets built so that exactly one family can carry the label.
"""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from difficulty_router import DifficultyRouter, FeatureCache, train_router
from difficulty_router.learning.families import FAMILIES, fit_families
from difficulty_router.learning.lexical import LexicalFeatures, LexicalProbe

QUERIES = ["What is 2 + 2?", "Prove that every finite integral domain is a field.",
           [{"role": "system", "content": "You are a tax lawyer."},
            {"role": "user", "content": "Does section 1031 cover a swap of shares in two private companies?"}],
           "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Mars\nD. Earth\nAnswer:"]


@pytest.fixture(scope="module")
def routers_by_family(extractor, sample_outcomes, sample_pool, tmp_path_factory):
    """One router per family, each forced to it (training keeps what it is given when only one is
    allowed); they share one feature cache so the 200 rows are extracted once."""
    cached = copy.copy(extractor)
    cached.feature_cache = FeatureCache(tmp_path_factory.mktemp("features"))
    train = sample_outcomes.subset(range(200))
    routers = {f: train_router(train, sample_pool, cached, layers=[15], pooling="last", cv=3, progress=False,
                               families=(f,)) for f in FAMILIES}
    for f, router in routers.items():
        assert router.family == f
        router.extractor = extractor
    return routers


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_round_trips_with_identical_decisions_and_no_pickle(family, routers_by_family, extractor,
                                                                          tmp_path, monkeypatch):
    router = routers_by_family[family]
    path = router.save(tmp_path / "r")
    assert json.loads((path / "manifest.json").read_text())["family"] == family

    def refuse(*args, **kwargs):
        raise AssertionError("loading a router must not unpickle anything")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = DifficultyRouter.load(path, extractor=extractor)
    assert loaded.family == family
    before, after = router.route_batch(QUERIES), loaded.route_batch(QUERIES)
    for a, b in zip(before, after):
        assert a.model == b.model
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-12)


def test_families_predict_differently(routers_by_family):
    """The families are different predictors, not one under several names."""
    proba = {f: r.predict_proba(QUERIES) for f, r in routers_by_family.items()}
    for i, a in enumerate(FAMILIES):
        for b in FAMILIES[i + 1:]:
            assert not np.allclose(proba[a], proba[b], atol=1e-3), (a, b)


def _rewrite_arrays(router, arrays_path, arrays):
    save_file(arrays, str(arrays_path), metadata={"family": router.family, "lexical": json.dumps(router.lexical.config())})


def test_tampered_lexical_arrays_are_refused(routers_by_family, extractor, tmp_path):
    router = routers_by_family["lexical"]
    path = router.save(tmp_path / "r")
    arrays = load_file(str(path / "probes.safetensors"))
    arrays["lexical.idf"] = arrays["lexical.idf"] * 1.5
    _rewrite_arrays(router, path / "probes.safetensors", arrays)
    with pytest.raises(ValueError, match="altered"):
        DifficultyRouter.load(path, extractor=extractor)

    # the n-gram settings live inside the hashed file; a manifest that claims others is refused
    path = router.save(tmp_path / "r2")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["lexical"]["ngram_range"] = [1, 3]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="altered"):
        DifficultyRouter.load(path, extractor=extractor)


def test_inconsistent_lexical_arrays_are_refused_even_with_a_matching_hash(routers_by_family, extractor, tmp_path):
    """Arrays rewritten *and* re-hashed (a hand-made bundle) are still checked for sense."""
    import hashlib

    router = routers_by_family["lexical"]
    path = router.save(tmp_path / "r")
    arrays = load_file(str(path / "probes.safetensors"))
    arrays["lexical.columns"] = arrays["lexical.columns"][::-1].copy()
    _rewrite_arrays(router, path / "probes.safetensors", arrays)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["arrays_sha256"] = hashlib.sha256((path / "probes.safetensors").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lexical arrays are inconsistent"):
        DifficultyRouter.load(path, extractor=extractor)


# -- selection by cross-validation, on sets where only one family can know the answer ------------------

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def _synthetic(signal: str, n: int = 400, seed: int = 0):
    """Two models, the strong one right more often. ``signal`` says what decides the weak model's success:
    a keyword in the text ("words") or a direction in the read-out ("readout"); the other family sees noise."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 32))
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(n)]
    if signal == "words":
        flag = rng.random(n) < 0.5
        texts = [t + (" quantum" if f else " garden") for t, f in zip(texts, flag)]
        weak_right = np.where(flag, rng.random(n) < 0.15, rng.random(n) < 0.85)
    else:
        score = features @ rng.normal(size=32)
        weak_right = rng.random(n) < 1 / (1 + np.exp(-2.5 * score / score.std()))
    strong_right = weak_right | (rng.random(n) < 0.5)
    scores = np.column_stack([weak_right, strong_right]).astype(float)
    costs = np.tile([1.0, 10.0], (n, 1))
    return features, texts, scores, costs, scores.mean(axis=0)


@pytest.mark.parametrize("signal, expected", [("words", "lexical"), ("readout", "activation")])
def test_cross_validation_picks_the_family_that_carries_the_label(signal, expected):
    features, texts, scores, costs, capability = _synthetic(signal)
    fit = fit_families(features, texts, scores, costs, capability)
    table = {row["family"]: row["cv_routing_quality"] for row in fit.table}
    assert set(table) == set(FAMILIES)
    # the shared model reads the same read-out: it may win where the read-out carries the label
    assert fit.family in ((expected, "stacked") if expected == "lexical" else (expected, "stacked", "shared")), table
    # the family without the signal is near chance; the chosen one is far above it
    other = "activation" if expected == "lexical" else "lexical"
    assert table[expected] > table[other] + 0.15, table
    # the stack never falls clearly below the family that knows
    assert table["stacked"] >= table[expected] - 0.03, table


def test_stack_beats_either_family_when_each_knows_half():
    """Each family carries a different half of the signal: the stack, which sees both, must win."""
    rng = np.random.default_rng(1)
    n = 500
    features = rng.normal(size=(n, 32))
    flag = rng.random(n) < 0.5
    texts = [" ".join(rng.choice(WORDS, 12)) + (" quantum" if f else " garden") for f in flag]
    direction = features @ rng.normal(size=32)
    score = 1.5 * direction / direction.std() + np.where(flag, -1.5, 1.5)
    weak_right = rng.random(n) < 1 / (1 + np.exp(-score))
    strong_right = weak_right | (rng.random(n) < 0.5)
    scores = np.column_stack([weak_right, strong_right]).astype(float)
    fit = fit_families(features, texts, scores, np.tile([1.0, 10.0], (n, 1)), scores.mean(axis=0))
    table = {row["family"]: row["cv_routing_quality"] for row in fit.table}
    assert fit.family == "stacked", table
    assert table["stacked"] > max(table["activation"], table["lexical"]) + 0.02, table
    aurocs = {row["family"]: row["cv_auroc"] for row in fit.table}
    assert aurocs["stacked"] > max(aurocs["activation"], aurocs["lexical"]) + 0.05, aurocs


def test_the_shared_family_ranks_best_where_one_ability_drives_a_many_model_pool():
    """Eight models ranked along one ability axis of the read-out, 200 labelled rows: per-model probes each
    estimate the axis alone, the shared model pools the labels, so its out-of-fold AUROC is higher and a
    stronger model less often gets the lower P(success). The lexical family reads random words here; with
    its n-gram kind and C chosen without the predicted fold (``nested_choice``) it sits at chance instead
    of the 0.53-0.57 that choosing on the predicted rows gave it.

    Not asserted: that routing quality picks the shared family. On this pool a chance-level predictor
    scatters queries between neighbouring models, which traces the chord between single models, and the
    frontier AUC of that mixture is as high as that of the true probabilities (measured, seeds 4-6)."""
    from test_shared_success import synthetic_pool

    for seed in (4, 5):
        features, scores, _ = synthetic_pool(200, m=8, seed=seed)
        texts = [" ".join(np.random.default_rng(i).choice(WORDS, 12)) for i in range(200)]
        costs = np.tile(np.geomspace(1, 30, 8), (200, 1))
        fit = fit_families(features, texts, scores, costs, scores.mean(axis=0))
        aurocs = {row["family"]: row["cv_auroc"] for row in fit.table}
        assert aurocs["shared"] > aurocs["activation"] + 0.03, aurocs
        assert abs(aurocs["lexical"] - 0.5) < 0.03, aurocs
        inversions = {f: float(np.mean(np.diff(p, axis=1) < 0)) for f, p in fit.oof.items()}
        assert inversions["shared"] < inversions["activation"] - 0.1, inversions
    features, texts, scores, costs, capability = _synthetic("words")
    assert fit_families(features, texts, scores, costs, capability).family != "shared"


def test_the_shared_family_starts_from_a_pretrained_trunk():
    """A trunk pretrained on other models' labels (disjoint rows) starts the shared family: with 80 labelled
    rows its out-of-fold AUROC beats the shared family fitted from scratch on the same rows. A trunk of
    another read-out width, or one given while the shared family is left out, is refused by name."""
    from test_shared_success import synthetic_pool

    from difficulty_router.learning.pretraining import pretrain_trunk

    features, scores, _ = synthetic_pool(2080, m=12, seed=3)
    pretrained = pretrain_trunk([(features[:2000], scores[:2000, :8])], n_components=None)
    rows, new = slice(2000, None), slice(8, None)
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, 12)) for i in range(80)]
    costs = np.tile(np.geomspace(1, 30, 4), (80, 1))
    args = (features[rows], texts, scores[rows, new], costs, scores[rows, new].mean(axis=0))
    started = fit_families(*args, families=("activation", "shared"), trunk=pretrained)
    scratch = fit_families(*args, families=("activation", "shared"))
    auroc = {name: {r["family"]: r["cv_auroc"] for r in fit.table} for name, fit in (("started", started),
                                                                                      ("scratch", scratch))}
    assert started.shared.mode_ in ("frozen", "fine-tuned") and scratch.shared.mode_ == "scratch"
    assert auroc["started"]["shared"] > auroc["scratch"]["shared"] + 0.03, auroc
    with pytest.raises(ValueError, match="trunk reads 60 read-out columns but the router's read-out has 59"):
        fit_families(features[rows, :59], *args[1:], trunk=pretrained)
    with pytest.raises(ValueError, match="for the shared family, which families="):
        fit_families(*args, families=("activation",), trunk=pretrained)
    with pytest.raises(ValueError, match="trunk must be a fitted SharedSuccessModel"):
        fit_families(*args, trunk="pretrained")


def test_train_router_starts_the_shared_family_from_a_trunk(extractor, sample_outcomes, sample_pool, tmp_path):
    """train_router(trunk=...) on a real read-out: the shared family starts from a trunk pretrained on other
    rows (info says how), the router saves and loads to the same decisions, and a trunk of another read-out
    width is refused by name."""
    from difficulty_router.learning.pretraining import pretrain_trunk

    cached = copy.copy(extractor)
    cached.feature_cache = FeatureCache(tmp_path / "features")
    other, train = sample_outcomes.subset(range(200, 500)), sample_outcomes.subset(range(200))
    other_x = cached.extract(other.queries, layers=[15], pooling="last", progress=False).features
    pretrained = pretrain_trunk([(other_x, other.scores)], ranks=(2,), alphas=(0.1,), n_components=16)
    router = train_router(train, sample_pool, cached, layers=[15], pooling="last", cv=3, progress=False,
                          families=("shared",), trunk=pretrained)
    assert router.family == "shared" and router.info["shared_start"]["mode"] in ("frozen", "fine-tuned")
    if router.info["shared_start"]["mode"] == "frozen":  # heads only: the trunk is the router's W
        np.testing.assert_array_equal(router.shared.W_, pretrained.W_)
    router.extractor = extractor
    again = DifficultyRouter.load(router.save(tmp_path / "r"))
    assert again.shared.mode_ == router.shared.mode_  # how it began survives the round trip
    assert [d.model for d in again.route_batch(QUERIES, progress=False)] == [
        d.model for d in router.route_batch(QUERIES, progress=False)]
    with pytest.raises(ValueError, match="trunk reads 576 read-out columns but the router's read-out has 1152"):
        train_router(train, sample_pool, cached, layers=[12, 15], pooling="last", cv=3, progress=False,
                     families=("shared",), trunk=pretrained)


def test_lexical_features_match_scikit_learn_tfidf():
    """The hashed read-out is tf-idf as scikit-learn computes it (sublinear tf, smooth idf, l2)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["the cat sat on the mat", "the dog sat", "a cat and a dog", "the the the cat"]
    ours = LexicalFeatures("word", (1, 1), min_df=1).fit(texts).transform(texts).toarray()
    theirs = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", sublinear_tf=True).fit_transform(texts).toarray()
    # the same values up to column order (hashing vs a vocabulary)
    assert np.allclose(np.sort(ours, axis=1), np.sort(theirs, axis=1), atol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(analyzer="bytes"), "analyzer"), (dict(ngram_range=(3, 1)), "ngram_range"), (dict(min_df=0), "min_df")])
def test_lexical_settings_are_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        LexicalFeatures(**bad)


def test_lexical_probe_rejects_non_text():
    with pytest.raises(ValueError, match="need strings; item 1 is int"):
        LexicalProbe().fit(["a b", 3, "c d"] * 5, np.ones(15))


def test_unknown_family_is_refused(extractor, sample_outcomes, sample_pool):
    with pytest.raises(ValueError, match="families must be a non-empty subset"):
        train_router(sample_outcomes.subset(range(60)), sample_pool, extractor, layers=[15], pooling="last", cv=3,
                     progress=False, families=("tfidf",))


def test_a_lexical_family_that_cannot_be_fitted_is_skipped_not_fatal():
    """Prompts without text (e.g. image-only turns) leave the read-out families (activation, shared) to route."""
    rng = np.random.default_rng(0)
    n = 60
    features = rng.normal(size=(n, 8))
    texts = [""] * n
    scores = np.column_stack([rng.random(n) < 0.4, rng.random(n) < 0.8]).astype(float)
    fit = fit_families(features, texts, scores, np.tile([1.0, 10.0], (n, 1)), scores.mean(axis=0), cv=3)
    assert fit.family in ("activation", "shared") and fit.lexical is None
    table = {row["family"]: row["cv_routing_quality"] for row in fit.table}
    assert table["lexical"] is None and table["stacked"] is None
    with pytest.raises(ValueError, match="lexical family cannot be fitted"):
        fit_families(features, texts, scores, np.tile([1.0, 10.0], (n, 1)), scores.mean(axis=0), cv=3,
                     families=("lexical",))
