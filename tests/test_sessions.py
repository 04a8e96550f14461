"""Session policies (per_call / sticky / cache_aware), the bounded session store, token prices
with a cached-input price, and the Binding integration.

Most tests feed :class:`RouteDecision` objects built by hand (the exact input a router gives
``Sessions.apply``), so each turn's probabilities are chosen to make a policy's rule decide; the
last tests route real queries through a real router (the shipped RouteLLM sample).
"""

from __future__ import annotations

import threading

import pytest

from difficulty_router.calling.dispatch import Binding, Reply, run_sync
from difficulty_router.core.pool import ModelPool, PoolModel
from difficulty_router.routing.decision import RouteDecision
from difficulty_router.routing.sessions import SESSION_POLICIES, Sessions, SessionState, SessionStore

WEAK, MID, STRONG = "weak", "mid", "strong"
ORDER = (WEAK, MID, STRONG)


def turn(probs, model, *, policy="utility", value=0.5, skipped=None, costs=None):
    """A per-call decision as the router makes one: ``model`` chosen, fallbacks = more capable eligible."""
    skipped = dict(skipped or {})
    rank = ORDER.index(model)
    return RouteDecision(
        model=model,
        probabilities=dict(zip(ORDER, probs, strict=True)),
        difficulty=3.0,
        difficulty_level=3,
        expected_cost=1.0,
        costs=costs or {WEAK: 0.1, MID: 0.5, STRONG: 1.0},
        policy=policy,
        parameter="lambda" if policy == "utility" else "tau",
        parameter_value=value,
        fallbacks=tuple(m for m in ORDER[rank + 1 :] if m not in skipped),
        skipped=skipped,
        capability_order=ORDER,
    )


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def state(model=WEAK):
    return SessionState(model=model, turns=1, context_tokens=0, switches=0, last_seen=0.0)


# -- the store -------------------------------------------------------------------------------
def test_store_evicts_the_least_recently_used_session_when_full():
    store = SessionStore(max_sessions=2, ttl_s=60)
    store.put("a", state(WEAK))
    store.put("b", state(MID))
    assert store.get("a").model == WEAK  # "a" is now the most recently used
    store.put("c", state(STRONG))
    assert len(store) == 2 and store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.evicted == 1


def test_store_forgets_sessions_after_their_ttl_and_get_counts_as_use():
    clock = Clock()
    store = SessionStore(max_sessions=10, ttl_s=30, clock=clock)
    store.put("a", state())
    store.put("b", state())
    clock.now += 20
    assert store.get("a") is not None  # touched: its 30 s start again
    clock.now += 15  # b unseen for 35 s, a for 15 s
    assert store.get("b") is None and store.get("a") is not None
    assert len(store) == 1 and store.expired == 1
    clock.now += 31
    assert len(store) == 0


def test_store_copies_states_in_and_out():
    store = SessionStore()
    mine = state(WEAK)
    store.put("a", mine)
    mine.model = STRONG
    got = store.get("a")
    got.turns = 99
    assert store.get("a").model == WEAK and store.get("a").turns == 1


def test_store_concurrent_puts_stay_bounded_and_consistent():
    store = SessionStore(max_sessions=50, ttl_s=600)
    errors = []

    def worker(t):
        try:
            for i in range(400):
                store.put(f"t{t}-{i}", SessionState(model=f"m{t}", turns=i, context_tokens=i, switches=0,
                                                    last_seen=0.0))
                got = store.get(f"t{t}-{i}")
                assert got is None or got.model == f"m{t}"
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(store) == 50
    assert store.evicted == 8 * 400 - 50  # 3,200 distinct keys were put: all but 50 were evicted, once each


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_sessions": 2.5}, "max_sessions"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": float("inf")}, "ttl_s"),
        ({"clock": 3}, "clock"),
    ],
)
def test_store_rejects_bad_settings(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SessionStore(**kwargs)


def test_bad_keys_and_settings_get_clear_errors():
    store = SessionStore()
    with pytest.raises(ValueError, match="session key"):
        store.put("", state())
    with pytest.raises(TypeError, match="session key must be a string"):
        store.get(12)
    with pytest.raises(ValueError, match="unknown session policy"):
        Sessions("stickyy")
    with pytest.raises(ValueError, match="margin"):
        Sessions("sticky", margin=1.5)
    with pytest.raises(ValueError, match="context_tokens"):
        Sessions("sticky").apply("s", turn((0.5, 0.6, 0.9), WEAK), context_tokens=-1)
    with pytest.raises(ValueError, match="capability order"):
        bare = RouteDecision(WEAK, {WEAK: 0.5, STRONG: 0.9}, 3, 3, 1, {}, "utility", "lambda", 1)
        Sessions("sticky").apply("s", bare)


# -- sticky ----------------------------------------------------------------------------------
TURNS = [  # (probabilities weak/mid/strong, the per-call choice)
    ((0.80, 0.85, 0.90), WEAK),
    ((0.40, 0.45, 0.90), STRONG),  # per call would switch: strong's gain 0.50
    ((0.70, 0.72, 0.74), MID),  # per call would switch: mid's gain 0.02 (below the margin)
    ((0.90, 0.91, 0.92), WEAK),
]


def run_session(sessions, key="s1", turns=TURNS):
    return [sessions.apply(key, turn(p, m)) for p, m in turns]


def test_per_call_leaves_every_decision_unchanged():
    sessions = Sessions("per_call")
    served = run_session(sessions)
    assert [d.model for d in served] == [m for _, m in TURNS] and all(d.session is None for d in served)
    assert sessions.model_for("s1") is None


def test_sticky_keeps_the_first_model_when_no_gain_clears_the_margin():
    sessions = Sessions("sticky", margin=0.6)  # strong's 0.50 gain on turn 2 does not clear 0.6
    served = run_session(sessions)
    assert [d.model for d in served] == [WEAK] * 4
    assert [d.session["action"] for d in served] == ["first", "kept", "kept", "kept"]
    assert served[1].session["per_call_choice"] == STRONG and served[-1].session["switches"] == 0
    assert served[1].fallbacks == (MID, STRONG)  # the fallbacks follow the served model


def test_sticky_escalates_when_the_gain_clears_the_margin_and_never_comes_back_down():
    sessions = Sessions("sticky", margin=0.05)
    served = run_session(sessions)
    assert [d.model for d in served] == [WEAK, STRONG, STRONG, STRONG]
    assert served[1].session["action"] == "switched" and "gain +0.500" in served[1].session["reason"]
    assert served[2].session["reason"] == "kept: no de-escalation mid-session"
    assert served[-1].session["switches"] == 1 and sessions.store.get("s1").switches == 1
    assert served[1].fallbacks == ()


def test_sticky_may_come_back_down_only_when_allowed_and_the_loss_is_within_the_margin():
    sessions = Sessions("sticky", margin=0.05, allow_deescalation=True)
    served = run_session(sessions)
    # turn 3: mid loses 0.02 against strong -> down to mid; turn 4: weak loses 0.01 against mid -> weak
    assert [d.model for d in served] == [WEAK, STRONG, MID, WEAK]


def test_sticky_switches_when_the_sessions_model_cannot_serve_this_turn():
    sessions = Sessions("sticky")
    sessions.apply("s", turn((0.8, 0.85, 0.9), WEAK))
    served = sessions.apply("s", turn((0.8, 0.85, 0.9), MID, skipped={WEAK: "cannot call tools"}))
    assert served.model == MID and "cannot call tools" in served.session["reason"]


def test_sessions_are_independent_and_a_missing_key_is_per_call():
    sessions = Sessions("sticky", margin=0.9)
    sessions.apply("a", turn((0.8, 0.85, 0.9), WEAK))
    sessions.apply("b", turn((0.2, 0.3, 0.9), STRONG))
    assert sessions.apply("a", turn((0.2, 0.3, 0.9), STRONG)).model == WEAK
    assert sessions.apply("b", turn((0.8, 0.85, 0.9), WEAK)).model == STRONG
    assert sessions.apply(None, turn((0.8, 0.85, 0.9), WEAK)).model == WEAK


def test_served_moves_the_session_to_the_model_that_answered():
    sessions = Sessions("sticky", margin=0.9)
    sessions.apply("s", turn((0.8, 0.85, 0.9), WEAK))
    sessions.served("s", MID)  # weak failed, mid answered the first turn
    assert sessions.model_for("s") == MID
    assert sessions.apply("s", turn((0.8, 0.85, 0.9), WEAK)).model == MID


def test_concurrent_turns_of_many_sessions_each_stay_on_one_model():
    sessions = Sessions("sticky", margin=0.9, store=SessionStore(max_sessions=1000))
    seen: dict[str, set] = {}
    lock = threading.Lock()

    def worker(t):
        for i in range(60):
            key = f"s{i % 10}-{t}"
            first = (WEAK, MID, STRONG)[(i + t) % 3]
            d = sessions.apply(key, turn((0.5, 0.6, 0.7), first))
            with lock:
                seen.setdefault(key, set()).add(d.model)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(seen) == 60 and all(len(models) == 1 for models in seen.values())
    assert all(sessions.store.get(k).turns == 6 for k in seen)


def test_a_store_stalled_on_one_session_holds_up_that_session_only():
    """A shared store that stalls on one session's read (a Redis or Ray actor answering slowly) holds up that
    session's turn only: another session's turn goes through meanwhile (one lock per process would queue it)."""
    entered, release = threading.Event(), threading.Event()

    class StallingStore(SessionStore):
        def get(self, key):
            if key == "stuck":
                entered.set()
                release.wait(10)
            return super().get(key)

    sessions = Sessions("sticky", store=StallingStore())
    other = next(k for k in (f"other-{i}" for i in range(1000)) if sessions._lock_for(k) is not sessions._lock_for("stuck"))
    stuck = threading.Thread(target=sessions.apply, args=("stuck", turn((0.5, 0.6, 0.7), WEAK)))
    stuck.start()
    assert entered.wait(5)
    done = threading.Event()
    threading.Thread(target=lambda: (sessions.apply(other, turn((0.5, 0.6, 0.7), MID)), done.set())).start()
    try:
        assert done.wait(5), "another session's turn waited for the stalled one"
        assert sessions.model_for(other) == MID
    finally:
        release.set()
        stuck.join()
    assert sessions.model_for("stuck") == WEAK


# -- cache-aware and token prices --------------------------------------------------------------
def priced_pool(cached_fraction=0.1):
    def model(name, price):
        return PoolModel(name=name, input_cost_per_1m=price, output_cost_per_1m=4 * price,
                         cached_input_cost_per_1m=cached_fraction * price, expected_output_tokens=100)

    return ModelPool((model(WEAK, 0.1), model(MID, 0.5), model(STRONG, 1.0)))


def test_token_cost_charges_cached_tokens_at_the_cached_price():
    entry = priced_pool().models[2]  # strong: input 1.0, cached 0.1, output 4.0 per 1M
    cost = entry.cost(input_tokens=10_000, cached_tokens=9_000, output_tokens=200)
    assert cost == pytest.approx((1_000 * 1.0 + 9_000 * 0.1 + 200 * 4.0) / 1e6)
    assert cost < entry.cost(input_tokens=10_000, output_tokens=200) / 2  # without the cache: 10,000 fresh
    ratio = PoolModel(name="x", input_cost_per_1m=1.0, output_cost_per_1m=1.0, tokens_per_extractor_token=1.5)
    assert ratio.cost(input_tokens=1_000, output_tokens=0) == pytest.approx(1_500 / 1e6)
    assert PoolModel(name="y", input_cost_per_1m=2.0, output_cost_per_1m=1.0).cost(
        input_tokens=100, cached_tokens=100, output_tokens=0) == pytest.approx(200 / 1e6)  # no cached price: full
    with pytest.raises(ValueError, match="exceed"):
        entry.cost(input_tokens=10, cached_tokens=11)
    with pytest.raises(ValueError, match="exactly one"):
        entry.cost()
    with pytest.raises(ValueError, match="cached_input_cost_per_1m needs token prices"):
        PoolModel(name="z", cost_per_query=1.0, cached_input_cost_per_1m=0.1)


def test_pool_round_trips_the_new_prices():
    pool = priced_pool()
    again = ModelPool.from_dict(pool.to_dict())
    assert again == pool and "tokens_per_extractor_token" not in pool.to_dict()["models"][0]


def test_cache_aware_stays_on_a_long_cached_context_where_per_call_switches():
    # the per-call choice on turn 2 is weak (cheap, nearly as good); the session sits on strong with 50k
    # cached tokens: staying costs 50k x 0.1/1M, switching re-reads 50k x 0.1/1M on weak, about the same.
    # With a short context the switch is worth it.
    pool = priced_pool()
    probs1, probs2 = (0.3, 0.5, 0.95), (0.85, 0.88, 0.9)
    long = Sessions("cache_aware", pool=pool)
    long.apply("s", turn(probs1, STRONG), context_tokens=50_000)
    kept = long.apply("s", turn(probs2, WEAK), context_tokens=50_500)
    assert kept.model == STRONG and kept.session["action"] == "kept" and kept.session["cached_tokens"] == 50_000
    assert kept.expected_cost == pytest.approx(pool[STRONG].cost(input_tokens=50_500, cached_tokens=50_000))

    short = Sessions("cache_aware", pool=pool)
    short.apply("s", turn(probs1, STRONG), context_tokens=0)
    switched = short.apply("s", turn(probs2, WEAK), context_tokens=0)
    assert switched.model == WEAK and switched.session["action"] == "switched"


def test_cache_aware_without_the_cached_price_would_switch():
    """The same session priced without a cache discount: staying is no cheaper, so it switches."""
    no_cache = Sessions("cache_aware", pool=priced_pool(cached_fraction=1.0))
    no_cache.apply("s", turn((0.3, 0.5, 0.95), STRONG), context_tokens=50_000)
    assert no_cache.apply("s", turn((0.85, 0.88, 0.9), WEAK), context_tokens=50_500).model == WEAK


def test_cache_aware_needs_token_prices():
    sessions = Sessions("cache_aware")
    sessions.apply("s", turn((0.3, 0.5, 0.95), STRONG), context_tokens=100)
    with pytest.raises(ValueError, match="needs the pool's token prices"):
        sessions.apply("s", turn((0.85, 0.88, 0.9), WEAK), context_tokens=200)


# -- the Binding and the record ------------------------------------------------------------
def test_binding_decides_per_session_and_the_record_carries_the_session(trained_router):
    weak, strong = trained_router.capability_order()[0], trained_router.capability_order()[-1]
    sessions = Sessions("sticky", margin=1.0)  # nothing clears a margin of 1: the first model stays
    binding = Binding(trained_router.models, router=trained_router, sessions=sessions)
    queries = ["What is 2 + 2?", "Prove that the set of prime numbers is infinite, step by step, rigorously.",
               "Name the capital of France.", "Explain the second law of thermodynamics in statistical terms."]
    per_call = [trained_router.route(q).model for q in queries]
    assert len(set(per_call)) > 1, f"precondition: per-call routing must differ across these queries, got {per_call}"
    served = []
    for q in queries:
        decision = binding.decide(q, session="conv-1", context_tokens=10 * (len(served) + 1))
        call = binding.start(decision)
        run_sync(call, lambda model: Reply(model, model, prompt_tokens=10, completion_tokens=5))
        record = call.record()
        assert record["session"]["key"] == "conv-1" and record["session"]["per_call_choice"] == per_call[len(served)]
        served.append(record["served_by"])
    assert len(set(served)) == 1 and served[0] == per_call[0]
    assert sessions.store.get("conv-1").turns == 4 and weak != strong
    # without a key the binding routes per call
    assert binding.decide(queries[1]).model == per_call[1]
    assert binding.decide(queries[1]).session is None


def test_binding_tells_the_session_which_model_served_after_a_fallback(trained_router):
    order = trained_router.capability_order()
    sessions = Sessions("sticky", margin=1.0)
    binding = Binding(trained_router.models, router=trained_router, sessions=sessions)
    decision = binding.decide("What is 2 + 2?", session="conv-2")
    call = binding.start(decision)

    def invoke(model):
        if model == decision.model and decision.fallbacks:
            raise TimeoutError("backend timed out")
        return Reply(model, model)

    run_sync(call, invoke)
    assert sessions.model_for("conv-2") == call.record()["served_by"]
    if decision.fallbacks:
        assert sessions.model_for("conv-2") == decision.fallbacks[0] != decision.model
        assert sessions.store.get("conv-2").switches == 0  # an escalation on the first turn is not a switch
    assert order == list(decision.capability_order)


def test_binding_refuses_sessions_of_the_wrong_type(trained_router):
    with pytest.raises(TypeError, match="sessions must be"):
        Binding(trained_router.models, router=trained_router, sessions="sticky")
    assert set(SESSION_POLICIES) == {"per_call", "sticky", "cache_aware"}


# -- shadow mode and the decision log ---------------------------------------------------------
def test_shadow_mode_serves_the_default_and_logs_the_routers_choice(trained_router, tmp_path):
    from difficulty_router.routing.decision_log import DecisionLog, prompt_sha256, read_log

    order = trained_router.capability_order()
    default = order[-1]
    log = DecisionLog(tmp_path / "decisions.jsonl")
    binding = Binding(trained_router.models, router=trained_router, shadow=default, decision_log=log)
    queries = ["What is 2 + 2?", "Name the capital of France.", "Which planet is largest?",
               "Prove Fermat's little theorem.", "Explain entropy in statistical mechanics."]
    calls = []
    for q in queries:
        decision = binding.decide(q)
        call = binding.start(decision, query=q)
        run_sync(call, lambda model: Reply(model, f"answer from {model}", prompt_tokens=12, completion_tokens=3))
        calls.append((q, decision, call.record()))
    assert all(record["served_by"] == default and record["mode"] == "shadow" for _, _, record in calls)
    assert [r["shadow"]["would_be"] for _, _, r in calls] == [d.model for _, d, _ in calls]
    would_be = {d.model for _, d, _ in calls}
    assert would_be - {default}, f"precondition: the router must choose a non-default model once, got {would_be}"
    lines = list(read_log(tmp_path / "decisions.jsonl"))
    assert len(lines) == len(queries)
    for (q, d, _), line in zip(calls, lines, strict=True):
        assert line["chosen"] == d.model and line["served_by"] == default
        assert line["probabilities"] == pytest.approx(d.probabilities) and line["prompt_sha256"] == prompt_sha256(q)
        assert line["predicted_cost"]["chosen"] == pytest.approx(d.expected_cost)
        assert line["shadow"]["default"] == default
        assert q not in (tmp_path / "decisions.jsonl").read_text()  # prompts are hashed, never stored


def test_shadow_sampling_also_asks_the_alternative_and_records_its_answer(trained_router, tmp_path):
    import random

    from difficulty_router.routing.decision_log import DecisionLog, read_log

    order = trained_router.capability_order()
    default = order[-1]
    binding = Binding(trained_router.models, router=trained_router, shadow=default, shadow_sample=1.0,
                      decision_log=DecisionLog(tmp_path / "log.jsonl"), rng=random.Random(0))
    asked = []

    def invoke(model):
        asked.append(model)
        return Reply(model, f"answer from {model}", completion_tokens=4)

    for q in ["What is 2 + 2?", "Name the capital of France.", "What colour is the sky?"]:
        decision = binding.decide(q)
        call = binding.start(decision, query=q)
        assert run_sync(call, invoke).value == default
        record = call.record()
        if decision.model != default:
            assert record["shadow"]["alternative_answer"]["text"] == f"answer from {decision.model}"
    sampled = [r for r in read_log(tmp_path / "log.jsonl") if r["shadow"]["sampled"]]
    assert sampled and all(r["shadow"]["alternative_answer"]["completion_tokens"] == 4 for r in sampled)
    assert asked.count(default) == 3 and len(asked) == 3 + len(sampled)
    with pytest.raises(ValueError, match="shadow_sample"):
        Binding(trained_router.models, router=trained_router, shadow_sample=0.5)
    with pytest.raises(ValueError, match="not among"):
        Binding(trained_router.models, router=trained_router, shadow="nope")


def test_decision_log_appends_whole_lines_from_threads_and_rotates(tmp_path):
    from difficulty_router.routing.decision_log import DecisionLog, read_log

    log = DecisionLog(tmp_path / "d.jsonl", max_bytes=4_000, backups=50)

    def worker(t):
        for i in range(50):
            log.append({"query_id": f"{t}-{i}", "chosen": WEAK, "probabilities": {WEAK: 0.5}})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    records = list(read_log(tmp_path / "d.jsonl"))
    assert sorted(r["query_id"] for r in records) == sorted(f"{t}-{i}" for t in range(4) for i in range(50))
    rotated = list(tmp_path.glob("d.jsonl.*"))
    assert rotated and all(p.stat().st_size <= 4_000 for p in rotated)
    with pytest.raises(ValueError, match="unknown keys"):
        log.append({"chosen": WEAK, "prompt": "secret"})
    (tmp_path / "bad.jsonl").write_text('{"chosen": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(read_log(tmp_path / "bad.jsonl"))
