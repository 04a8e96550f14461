"""DifficultyRouterLLM with sessions= inside LlamaIndex's FunctionAgent: one model per session under sticky.

Real pieces: the trained router (real SmolLM2 extractor and probes), a real FunctionAgent, and
both tiers as LlamaIndex's OpenAILike on real llama.cpp ``chatml-function-calling`` servers
(SmolLM2-135M GGUF) behind the relay that fixes the ``content: null`` llama-cpp-python rejects in
tool histories (see test_langchain_router.LoopbackServer). As in test_llamaindex_engines, the
agent runs unstreamed, the tool is named (``initial_tool_choice``) and returns directly, so each
agent run is one routed call (with the tool's result going back to the model, SmolLM2-135M calls
the tool again and again); a session is two runs, two user turns on one chat ``Memory``.

Both servers run the same GGUF, greedy, so a conversation is the same whichever tier serves: a
per-call pass measures P(weak succeeds) for each turn, and the sticky pass sets the router's
threshold between them, so per-call routing would switch tiers between the turns and sticky must not.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import STRONG, WEAK
from helpers import router_with_policy
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.memory import Memory
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai_like import OpenAILike
from llamaindex_events import Recorder
from test_langchain_router import LoopbackServer

from difficulty_router import Policy, Sessions
from llamaindex_difficulty_router import DifficultyRouterLLM

ALIAS = {WEAK: "small", STRONG: "large"}
HARD = ("Compute the fundamental group of the complement of a trefoil knot in S^3 and show that it is not "
        "abelian. Also, what is the weather in Paris?")
EASY = "What is the weather in Rome?"


@pytest.fixture(scope="module")
def tiers(llama_tool_backends):
    with LoopbackServer(llama_tool_backends["small"], null_content="") as small, \
            LoopbackServer(llama_tool_backends["large"], null_content="") as large:
        urls = {"small": small.url, "large": large.url}
        yield {name: OpenAILike(api_base=urls[alias], model=alias, api_key="none", is_chat_model=True,
                                is_function_calling_model=True, max_tokens=16, temperature=0, max_retries=0,
                                timeout=60, context_window=2048)
               for name, alias in ALIAS.items()}


def get_weather(city: str) -> str:
    """Report the current weather in a city."""
    return f"Sunny in {city}"


def agent_for(llm: DifficultyRouterLLM) -> FunctionAgent:
    return FunctionAgent(tools=[FunctionTool.from_defaults(get_weather, return_direct=True)], llm=llm,
                         streaming=False, initial_tool_choice="get_weather")


def two_turns(llm: DifficultyRouterLLM, recorder: Recorder, *, same_history: bool = True) -> list[dict]:
    """Two user turns on one agent, on one chat memory when ``same_history`` (else each turn starts a
    new history); each turn's routing decision."""
    agent = agent_for(llm)

    async def run():
        shared = Memory.from_defaults(session_id="chat", token_limit=4000)
        for question in (HARD, EASY):
            memory = shared if same_history else Memory.from_defaults(session_id="one-off", token_limit=4000)
            result = await agent.run(user_msg=question, memory=memory)
            assert str(result).startswith("Sunny in") and [t.tool_name for t in result.tool_calls] == ["get_weather"]

    asyncio.run(run())
    routes = recorder.named("DifficultyRouteEvent")
    assert [r.operation for r in routes] == ["achat_with_tools", "achat_with_tools"]
    return [r.decision for r in routes]


def test_function_agent_keeps_one_model_per_session_under_sticky(trained_router, tiers, recorder):
    """The session key derived from the chat history's opening (the first user message) is the same
    for both turns of one memory; per call the turns go to different tiers, under sticky both go to the first's."""
    probe = two_turns(DifficultyRouterLLM(router=trained_router, llms=tiers), recorder)
    first, second = (d["probabilities"][WEAK] for d in probe)
    assert first < second, f"the test needs the first turn to look harder: P(weak) {first:.3f} vs {second:.3f}"
    router = router_with_policy(trained_router, Policy("threshold", (first + second) / 2))

    recorder.events.clear()
    per_call = two_turns(DifficultyRouterLLM(router=router, llms=tiers, sessions="per_call"), recorder)
    assert [d["model"] for d in per_call] == [STRONG, WEAK]

    recorder.events.clear()
    llm = DifficultyRouterLLM(router=router, llms=tiers, sessions="sticky")
    sticky = two_turns(llm, recorder)
    assert [d["model"] for d in sticky] == [STRONG, STRONG], f"the session switched models under sticky: {[d['session'] for d in sticky]}"
    assert [e.model_dict["model_name"] for e in recorder.named("LLMChatStartEvent")] == ["large", "large"]
    keys = {d["session"]["key"] for d in sticky}
    assert len(keys) == 1 and next(iter(keys)).startswith("conversation:")
    assert [d["session"]["action"] for d in sticky] == ["first", "kept"]
    assert sticky[1]["session"]["per_call_choice"] == WEAK
    assert llm.sessions.model_for(next(iter(keys))) == STRONG


def test_a_named_session_spans_separate_conversations(trained_router, tiers, recorder):
    """Inside ``llm.session(key)`` two separate chat histories (fresh memories) are one session."""
    hard = trained_router.route([{"role": "user", "content": HARD}]).probabilities[WEAK]
    easy = trained_router.route([{"role": "user", "content": EASY}]).probabilities[WEAK]
    assert hard < easy
    router = router_with_policy(trained_router, Policy("threshold", (hard + easy) / 2))
    llm = DifficultyRouterLLM(router=router, llms=tiers, sessions=Sessions("sticky"))
    with llm.session("user-1"):
        decisions = two_turns(llm, recorder, same_history=False)
    assert [d["model"] for d in decisions] == [STRONG, STRONG]
    assert [d["session"]["key"] for d in decisions] == ["user-1", "user-1"]
    assert decisions[1]["session"]["per_call_choice"] == WEAK

    recorder.events.clear()
    apart = two_turns(llm, recorder, same_history=False)  # no named session: each history is its own
    assert [d["model"] for d in apart] == [STRONG, WEAK]
    assert len({d["session"]["key"] for d in apart}) == 2


def test_session_needs_sessions(trained_router, tiers):
    llm = DifficultyRouterLLM(router=trained_router, llms=tiers)
    with pytest.raises(ValueError, match="no sessions="), llm.session("k"):
        pass
    with pytest.raises(ValueError, match="unknown session policy"):
        DifficultyRouterLLM(router=trained_router, llms=tiers, sessions="sometimes")
