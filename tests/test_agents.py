"""LangChain agents on the router: the decision model (``langchain_core.decisions``), LangChain's own
``ModelRouterMiddleware`` driven by it, our ``DifficultyRouterMiddleware``, and session policies.

Real pieces: the router (real SmolLM2 extractor, probes trained on RouteLLM MMLU rows), real
``create_agent`` runs with a real tool, pool models that are ChatOpenAI over two real llama.cpp
servers on SmolLM2-135M with ``chatml-function-calling`` (behind the relay that fixes the
``content: null`` llama-cpp-python rejects in tool histories; see test_langchain_router).

SmolLM2-135M cannot be trusted to decide to call a tool, so the first model step of each agent
run names the tool (``tool_choice``) and the step after the tool's result gets no tools, so it
answers in text: every run is exactly "call add, read its result, answer" (two model calls). Both
servers run the same GGUF, greedy: the conversation is the same whichever tier serves, so the
router's per-call probabilities for each step can be measured in one run and relied on in the next.

To make the session tests able to fail, the router's operating point (a threshold tau) is set
between the per-call P(weak succeeds) of the run's steps, so per-call routing *would* switch tiers
within the session; ``sticky`` must keep the first step's tier, and the record must show it.
"""

from __future__ import annotations

import asyncio

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelChoice, ModelRouterMiddleware
from langchain_core.decisions import Box, Choice, ChoiceAnswer, Noul, Score
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from test_langchain_router import LoopbackServer, add, chat_openai, check_add_call

from difficulty_router import DifficultyRouter, Policy
from difficulty_router.routing.sessions import Sessions
from langchain_difficulty_router import (
    RECORD_KEY,
    DifficultyDecisionModel,
    DifficultyRouterMiddleware,
    to_router_query,
)

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
ALIAS = {WEAK: "small", STRONG: "large"}
HARD = ("Compute the fundamental group of the complement of a trefoil knot in S^3 and show that it is not "
        "abelian. Use the add tool for 20 + 22.")
EASY = "What is 2 + 3?"
ROUTE_CHOICE = Choice(instructions="Which model should serve this request?",
                      criteria={WEAK: "cheap, for easy requests", STRONG: "capable, for hard ones"})


def with_policy(router: DifficultyRouter, policy: Policy) -> DifficultyRouter:
    """A router sharing the trained probes with its own policy (the session fixture stays untouched)."""
    return DifficultyRouter(router.extractor, router.pool, router.probe, layers=router.layers, pooling=router.pooling,
                            capability=router.capability, policy=policy, difficulty_probe=router.difficulty_probe)


def p_weak(router: DifficultyRouter, query) -> float:
    return router.route(query).probabilities[WEAK]


def between(low: float, high: float) -> Policy:
    """The threshold policy that sends P(weak) = low to STRONG and P(weak) = high to WEAK."""
    assert low < high, f"the test needs the first step to look harder than the later one: {low:.3f} vs {high:.3f}"
    return Policy("threshold", (low + high) / 2)


@pytest.fixture(scope="module")
def tool_pool(llama_tool_backends):
    with LoopbackServer(llama_tool_backends["small"], null_content="") as small, \
            LoopbackServer(llama_tool_backends["large"], null_content="") as large:
        urls = {"small": small.url, "large": large.url}
        yield {name: chat_openai(urls[alias], alias, max_tokens=16) for name, alias in ALIAS.items()}


class AddThenAnswer(AgentMiddleware):
    """The first step names the tool; the step after its result answers in text (no tools)."""

    @staticmethod
    def _step(request):
        if isinstance(request.messages[-1], ToolMessage):
            return request.override(tools=[])
        return request.override(tool_choice="add")

    def wrap_model_call(self, request, handler):
        return handler(self._step(request))

    async def awrap_model_call(self, request, handler):
        return await handler(self._step(request))


add_then_answer = AddThenAnswer()


def run_messages(result: dict, start: int = 0) -> list:
    return result["messages"][start:]


def check_finished(messages: list) -> None:
    """The run called add with valid arguments, got its real result, and answered in text."""
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    call = messages[1].tool_calls[0]
    check_add_call(call)
    assert messages[2].tool_call_id == call["id"] and messages[2].content == str(add.invoke(call["args"]))
    assert not messages[3].tool_calls and messages[3].text


# --------------------------------------------------------------------------------------
# The decision model's answers
# --------------------------------------------------------------------------------------
def test_choice_is_the_routers_decision_with_a_distribution(trained_router):
    model = DifficultyDecisionModel(router=trained_router)
    for query in (EASY, HARD):
        decision = trained_router.route(query)
        answer = model.invoke({"state": query, "questions": {"route": ROUTE_CHOICE}}).choices["route"]
        assert answer.choice == decision.model
        assert set(answer.probabilities) == {WEAK, STRONG}
        assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-12)
        # P(WEAK is the cheapest model that answers) = P(WEAK answers); the rest goes to STRONG
        assert answer.probabilities[WEAK] == pytest.approx(decision.probabilities[WEAK])
        assert answer.confidence == pytest.approx(decision.probabilities[decision.model])


def test_choice_labels_can_be_mapped_and_offered_subsets_are_respected(trained_router):
    weak_first = with_policy(trained_router, Policy("threshold", 0.0))  # would pick WEAK for everything
    model = DifficultyDecisionModel(router=weak_first, routes={"fast": WEAK, "powerful": STRONG})
    both = Choice(instructions="route", criteria={"fast": "cheap", "powerful": "capable"})
    only_strong = Choice(instructions="route", criteria={"powerful": "capable"})
    assert model.invoke({"state": EASY, "questions": {"r": both}}).choices["r"].choice == "fast"
    answer = model.invoke({"state": EASY, "questions": {"r": only_strong}}).choices["r"]
    assert answer.choice == "powerful" and answer.probabilities == {"powerful": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="neither a pool model"):
        model.invoke({"state": EASY, "questions": {"r": Choice(instructions="x", criteria={"other": None})}})
    with pytest.raises(ValueError, match="not in the router's pool"):
        DifficultyDecisionModel(router=trained_router, routes={"fast": "gpt-5"})
    with pytest.raises(ValueError, match="both name the pool model"):
        DifficultyDecisionModel(router=trained_router, routes={"a": WEAK}).invoke(
            {"state": EASY, "questions": {"r": Choice(instructions="x", criteria={"a": None, WEAK: None})}})


@pytest.mark.parametrize("levels", [5, 3, 2])
def test_score_is_the_routers_difficulty_and_noul_the_cheapest_failing(trained_router, levels):
    model = DifficultyDecisionModel(router=trained_router)
    rubric = [f"level {i}" for i in range(levels)]
    questions = {"difficulty": Score(instructions="How hard?", criteria=rubric),
                 "cheap_fails": Noul(instructions="Will the cheapest model get it wrong?")}
    for query in (EASY, HARD):
        decision = trained_router.route(query)
        response = model.invoke({"state": query, "questions": questions})
        score = response.scores["difficulty"]
        assert sum(score.probabilities.values()) == pytest.approx(1.0)
        assert score.score == pytest.approx((decision.difficulty - 1) / 4 * (levels - 1))
        assert score.legend == dict(enumerate(rubric))
        assert score.confidence == pytest.approx(max(score.probabilities.values()))
        if levels == 5:
            assert round(score.score) + 1 == decision.difficulty_level
        # WEAK (Mixtral) is the cheaper pool model
        assert response.nouls["cheap_fails"].noul == pytest.approx(1 - decision.probabilities[WEAK])


def test_state_is_read_like_the_routed_chat_models_input(trained_router):
    """A string, a message list and an agent state with messages are the same query; Box is refused."""
    model = DifficultyDecisionModel(router=trained_router)
    conversation = [SystemMessage("You are terse."), HumanMessage(EASY)]
    expected = trained_router.route(to_router_query(conversation))

    def probabilities(state):
        return model.invoke({"state": state, "questions": {"r": ROUTE_CHOICE}}).choices["r"].probabilities

    assert probabilities(conversation) == pytest.approx(probabilities({"messages": conversation}))
    noul = model.invoke({"state": {"messages": conversation}, "questions": {"n": Noul(instructions="?")}}).nouls["n"]
    assert noul.noul == pytest.approx(1 - expected.probabilities[WEAK])
    assert probabilities(HumanMessage(EASY)) == pytest.approx(probabilities(EASY))
    with pytest.raises(ValueError, match="Box"):
        model.invoke({"state": EASY, "questions": {"b": Box(instructions="find the cat")}})
    with pytest.raises(TypeError, match="decision state"):
        model.invoke({"state": 42, "questions": {"r": ROUTE_CHOICE}})


def test_decision_model_follows_the_session_of_the_run(trained_router):
    """With sessions='sticky', a Choice for a thread keeps that thread's first model although the
    per-call decision changes; another thread, and a model without sessions, route per call."""
    router = with_policy(trained_router, between(p_weak(trained_router, HARD), p_weak(trained_router, EASY)))
    sticky = DifficultyDecisionModel(router=router, sessions="sticky")
    per_call = DifficultyDecisionModel(router=router)

    def choose(model, query, thread=None):
        config = {"configurable": {"thread_id": thread}} if thread else None
        return model.invoke({"state": query, "questions": {"r": ROUTE_CHOICE}}, config).choices["r"].choice

    assert choose(per_call, HARD) == STRONG and choose(per_call, EASY) == WEAK
    assert choose(sticky, HARD, "t1") == STRONG
    assert choose(sticky, EASY, "t1") == STRONG  # kept: sticky never de-escalates mid-session
    assert choose(sticky, EASY, "t2") == WEAK
    assert sticky._sessions.model_for("t1") == STRONG


# --------------------------------------------------------------------------------------
# Real agents
# --------------------------------------------------------------------------------------
def test_model_router_middleware_with_our_decision_model(trained_router, tool_pool):
    """LangChain's ModelRouterMiddleware with DifficultyDecisionModel as its classifier, no glue: each
    run is classified once (its latest human message), every model call of the run goes to the chosen
    tier, and under sticky the second run of the thread stays on the first run's tier although the
    router alone would send its question to the cheaper one."""
    router = with_policy(trained_router, between(p_weak(trained_router, HARD), p_weak(trained_router, EASY)))
    classifier = DifficultyDecisionModel(router=router, sessions="sticky")
    middleware = ModelRouterMiddleware(
        choices={WEAK: ModelChoice(model=tool_pool[WEAK], criteria="cheap, for easy requests"),
                 STRONG: ModelChoice(model=tool_pool[STRONG], criteria="capable, for hard ones")},
        instructions="Choose the cheapest model that will answer correctly.",
        classifier=classifier,
    )
    agent = create_agent(tool_pool[WEAK], tools=[add], middleware=[middleware, add_then_answer],
                         checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "thread-1"}}
    runs = []
    for question in (HARD, EASY):
        before = len(agent.get_state(config).values.get("messages", []))
        state = agent.invoke({"messages": [HumanMessage(question)]}, config)
        messages = run_messages(state, before)
        check_finished(messages)
        answer = state["model_route"]
        assert isinstance(answer, ChoiceAnswer) and sum(answer.probabilities.values()) == pytest.approx(1.0)
        served = {m.response_metadata["model_name"] for m in messages if isinstance(m, AIMessage)}
        assert served == {ALIAS[answer.choice]}, "a model call of the run went to another tier than the choice"
        runs.append(answer.choice)
    assert runs == [STRONG, STRONG]
    per_call = DifficultyDecisionModel(router=router)
    assert per_call.invoke({"state": HumanMessage(EASY), "questions": {"r": ROUTE_CHOICE}}).choices["r"].choice == WEAK


def run_with_middleware(router, tool_pool, sessions, thread: str) -> list[AIMessage]:
    middleware = DifficultyRouterMiddleware(router, tool_pool, sessions=sessions)
    agent = create_agent(tool_pool[WEAK], tools=[add], middleware=[middleware, add_then_answer])
    messages = agent.invoke({"messages": [HumanMessage(HARD)]}, {"configurable": {"thread_id": thread}})["messages"]
    check_finished(messages)
    return [m for m in messages if isinstance(m, AIMessage)]


def test_our_middleware_routes_every_call_and_sticky_keeps_the_sessions_model(trained_router, tool_pool):
    """DifficultyRouterMiddleware decides each model call on the conversation so far. Per call, the
    run's two steps switch tiers (the tau set between their P(weak)); under sticky, with the run's
    thread_id as the session key, the second step stays on the first step's tier and says why."""
    probe = run_with_middleware(trained_router, tool_pool, None, "probe")
    first, second = (m.response_metadata[RECORD_KEY]["decision"]["probabilities"][WEAK] for m in probe)
    router = with_policy(trained_router, between(first, second))

    per_call = run_with_middleware(router, tool_pool, "per_call", "t-per-call")
    assert [m.response_metadata[RECORD_KEY]["served_by"] for m in per_call] == [STRONG, WEAK]
    assert [m.response_metadata["model_name"] for m in per_call] == ["large", "small"]

    sticky = run_with_middleware(router, tool_pool, Sessions("sticky"), "t-sticky")
    records = [m.response_metadata[RECORD_KEY] for m in sticky]
    assert [r["served_by"] for r in records] == [STRONG, STRONG], "the session switched models under sticky"
    assert [m.response_metadata["model_name"] for m in sticky] == ["large", "large"]
    assert [r["session"]["key"] for r in records] == ["t-sticky", "t-sticky"]
    assert [r["session"]["action"] for r in records] == ["first", "kept"]
    assert records[1]["session"]["per_call_choice"] == WEAK
    assert records[0]["decision"]["skipped"] == {} and records[0]["attempts"][0]["outcome"] == "accepted"


def test_our_middleware_async_and_a_named_session(trained_router, tool_pool):
    """ainvoke goes through awrap_model_call; session_id= names the session for every run (two runs
    on different threads share it), and the record is on each model message."""
    router = with_policy(trained_router, Policy("threshold", 0.0))  # per call: always WEAK
    sessions = Sessions("sticky")
    sessions.store.put("user-7", _state(STRONG))  # the user's session is already on STRONG
    middleware = DifficultyRouterMiddleware(router, tool_pool, sessions=sessions, session_id="user-7")
    agent = create_agent(tool_pool[WEAK], tools=[add], middleware=[middleware, add_then_answer])

    async def run(thread):
        return await agent.ainvoke({"messages": [HumanMessage(EASY)]}, {"configurable": {"thread_id": thread}})

    for thread in ("a", "b"):
        messages = asyncio.run(run(thread))["messages"]
        check_finished(messages)
        records = [m.response_metadata[RECORD_KEY] for m in messages if isinstance(m, AIMessage)]
        assert [r["served_by"] for r in records] == [STRONG, STRONG]
        assert {r["session"]["key"] for r in records} == {"user-7"}
        assert {r["session"]["per_call_choice"] for r in records} == {WEAK}


def _state(model: str):
    from difficulty_router.routing.sessions import SessionState

    return SessionState(model=model, turns=1, context_tokens=0, switches=0, last_seen=0.0)


def test_middleware_refuses_bad_configuration(trained_router, tool_pool):
    with pytest.raises(ValueError, match="not in the router's pool"):
        DifficultyRouterMiddleware(trained_router, {**tool_pool, "gpt-5": tool_pool[WEAK]})
    with pytest.raises(ValueError, match="unknown session policy"):
        DifficultyRouterMiddleware(trained_router, tool_pool, sessions="always")
    with pytest.raises(TypeError, match="not a LangChain chat model"):
        DifficultyRouterMiddleware(trained_router, {WEAK: tool_pool[WEAK], STRONG: "gpt-4"})
    with pytest.raises(ValueError, match="tool_calling= names"):
        DifficultyRouterMiddleware(trained_router, tool_pool, tool_calling={"gpt-5": True})


def test_routed_chat_model_keeps_a_threads_model_under_sticky(trained_router, tool_pool):
    """ChatDifficultyRouter(sessions="sticky"): calls whose config names a thread (or a session_id)
    stay on that session's first model; calls without one route per call."""
    from langchain_difficulty_router import ChatDifficultyRouter

    router = with_policy(trained_router, between(p_weak(trained_router, HARD), p_weak(trained_router, EASY)))
    chat = ChatDifficultyRouter(router=router, models=tool_pool, sessions="sticky")

    def served(query, configurable=None):
        message = chat.invoke(query, {"configurable": configurable} if configurable else None)
        return message.response_metadata[RECORD_KEY]["served_by"], message.response_metadata[RECORD_KEY]["session"]

    assert served(HARD, {"thread_id": "t"})[0] == STRONG
    model, session = served(EASY, {"thread_id": "t"})
    assert model == STRONG and session["action"] == "kept" and session["per_call_choice"] == WEAK
    assert served(EASY, {"session_id": "s", "thread_id": "t"})[0] == WEAK  # session_id wins over thread_id
    assert served(EASY) == (WEAK, None)
