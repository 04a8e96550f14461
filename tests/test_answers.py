"""The core's reading of a decision as typed answers (difficulty_router.calling.answers) and the session-key
helpers (difficulty_router.routing.session_keys), on decisions with known numbers: the sums checked here
are done by hand, so a wrong formula fails."""

from __future__ import annotations

import pytest

from difficulty_router import RouteDecision, Sessions
from difficulty_router.calling.answers import (
    cheapest_failure,
    choice_distribution,
    cost_order,
    difficulty_distribution,
    expected_level,
)
from difficulty_router.routing.session_keys import as_sessions, config_session_key, conversation_key, prompt_tokens

ORDER = ["small", "medium", "large"]  # least to most capable


def decision(probabilities: dict[str, float], costs: dict[str, float], difficulty: float | None = None):
    fail = sum(1 - p for p in probabilities.values()) / len(probabilities)
    difficulty = 1 + 4 * fail if difficulty is None else difficulty
    return RouteDecision(model="small", probabilities=probabilities, difficulty=difficulty,
                         difficulty_level=int(round(difficulty)), expected_cost=costs["small"], costs=costs,
                         policy="threshold", parameter="tau", parameter_value=0.5)


D = decision({"small": 0.5, "medium": 0.8, "large": 0.9}, {"small": 1.0, "medium": 2.0, "large": 10.0})


def test_choice_distribution_is_the_cheapest_model_that_answers():
    dist = choice_distribution(D, ORDER)
    # small answers: 0.5; small fails and medium answers: 0.5 * 0.8; then large: 0.5 * 0.2 * 0.9, plus all fail 0.01
    assert dist == pytest.approx({"small": 0.5, "medium": 0.4, "large": 0.09 + 0.01})
    assert sum(dist.values()) == pytest.approx(1.0)
    offered = choice_distribution(D, ORDER, ["medium", "large"])
    assert offered == pytest.approx({"medium": 0.8, "large": 0.2})
    with pytest.raises(ValueError, match="not in the decision's pool"):
        choice_distribution(D, ORDER, ["medium", "gpt-5"])


def test_cost_order_and_cheapest_failure_follow_the_queries_costs():
    priced = decision({"small": 0.5, "medium": 0.8, "large": 0.9}, {"small": 3.0, "medium": 2.0, "large": 2.0})
    assert cost_order(priced, ORDER) == ["medium", "large", "small"]  # equal costs: less capable first
    assert cheapest_failure(priced, ORDER) == pytest.approx(0.2)
    assert cheapest_failure(D, ORDER) == pytest.approx(0.5)


def test_difficulty_distribution_from_the_share_of_models_that_fail():
    levels = difficulty_distribution(D, 5)
    # P(k of 3 fail) with fail probabilities 0.5, 0.2, 0.1: k=0 .36, k=1 .49, k=2 .14, k=3 .01;
    # share k/3 on levels 0..4 sits at 0, 4/3, 8/3, 4
    k = [0.36, 0.49, 0.14, 0.01]
    expected = [k[0], k[1] * 2 / 3, k[1] / 3 + k[2] / 3, k[2] * 2 / 3, k[3]]
    assert [levels[i] for i in range(5)] == pytest.approx(expected)
    assert expected_level(levels) == pytest.approx(D.difficulty - 1)
    assert expected_level(difficulty_distribution(D, 3)) == pytest.approx((D.difficulty - 1) / 2)


def test_difficulty_distribution_of_a_point_estimate():
    probe = decision({"small": 0.5, "medium": 0.8, "large": 0.9}, D.costs, difficulty=3.5)
    assert difficulty_distribution(probe, 5, derived=False) == pytest.approx({0: 0, 1: 0, 2: 0.5, 3: 0.5, 4: 0})
    assert difficulty_distribution(probe, 2, derived=False) == pytest.approx({0: 0.375, 1: 0.625})
    with pytest.raises(ValueError, match="at least 2 levels"):
        difficulty_distribution(probe, 1)


def test_session_keys():
    assert config_session_key({"configurable": {"thread_id": "t", "session_id": "s"}}) == "s"
    assert config_session_key({"configurable": {"thread_id": 7}}) == "7"
    assert config_session_key({"configurable": {}}) is None and config_session_key(None) is None
    with pytest.raises(TypeError, match="thread_id"):
        config_session_key({"configurable": {"thread_id": ["a"]}})
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    later = [*first, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert conversation_key(first) == conversation_key(later) != conversation_key([first[1]])
    assert conversation_key(first) != conversation_key([{"role": "system", "content": "Be long."}, first[1]])
    assert as_sessions("sticky").policy == "sticky" and as_sessions(None) is None
    sessions = Sessions("cache_aware")
    assert as_sessions(sessions) is sessions
    with pytest.raises(ValueError, match="unknown session policy"):
        as_sessions("always")
    with pytest.raises(TypeError, match="policy name"):
        as_sessions(3)
    assert prompt_tokens(None, "x" * 42) == 12  # "user: " + 42 characters, at 4 characters a token
