"""The adapter inside LlamaIndex's own machinery: query engines, a chat engine, agents,
Settings.llm, and RouterQueryEngine with DifficultySelector.

Generation runs on the real SmolLM2-135M (llama-index-llms-huggingface, greedy, a few new
tokens). No embedding model can be downloaded here, so indexes are SummaryIndex (no
embeddings) except one VectorStoreIndex on MockEmbedding. FunctionAgent's tool-calling tier
is LlamaIndex's OpenAILike on a real llama.cpp ``chatml-function-calling`` server; the
ReAct agent's tier is scripted, because SmolLM2-135M does not follow the ReAct format (see
ScriptedReAct).
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import pytest
from calibration_queries import EASY_CALIBRATION, HARD_CALIBRATION
from conftest import proba_atol
from llama_index.core import Document, Settings, SummaryIndex, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.query_engine import RouterQueryEngine
from llama_index.core.tools import FunctionTool, QueryEngineTool
from llama_index.llms.huggingface import HuggingFaceLLM
from llama_index.llms.openai_like import OpenAILike
from llamaindex_events import Recorder

from difficulty_router import DifficultyRouter, Policy
from llamaindex_difficulty_router import (
    CANNOT_CALL_TOOLS,
    ROUTING_KEY,
    DifficultyRouterLLM,
    DifficultySelector,
    to_router_messages,
)

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
EASY_QUERIES = [
    "What is 2 + 2?", "What is the capital of France?", "How many days are in a week?",
    "What color is the sky on a clear day?", "What is 10 minus 3?", "Which animal says moo?",
    "How many legs does a spider have?", "What is the opposite of hot?",
]
HARD_QUERIES = [
    "Let X be a compact Hausdorff space and C(X) the Banach algebra of continuous complex functions on X. "
    "Which of the following characterizes the maximal ideals of C(X)?",
    "Prove that every finite integral domain is a field, then determine the number of monic irreducible "
    "polynomials of degree 4 over GF(3).",
    "A particle moves in a central potential V(r) = -k/r + c/r^2. Derive the precession rate of the perihelion "
    "to first order in c and state its sign.",
    "In a Nash equilibrium of a second-price sealed-bid auction with correlated private values and a reserve "
    "price, which bidding strategies are weakly dominant, and how does revenue compare to the first-price auction?",
    "Compute the fundamental group of the complement of a trefoil knot in S^3 and show that it is not abelian.",
    "Given a Markov chain on a countable state space that is irreducible and null recurrent, what can be said "
    "about its stationary measures and the limit of the n-step transition probabilities?",
    "Under the Basel III framework, how does the liquidity coverage ratio interact with the net stable funding "
    "ratio when a bank securitises a pool of mortgages held at amortised cost?",
    "Which of the following best describes the role of the Wnt/beta-catenin pathway in the asymmetric division "
    "of hematopoietic stem cells, and how does GSK-3 inhibition alter it?",
]
EASY, HARD = EASY_QUERIES[0], HARD_QUERIES[0]
DOCS = [
    Document(text="Acme Corp was founded in 1999 in Lyon. It makes bicycle parts."),
    Document(text="Acme's best-selling product is a titanium chain ring, sold since 2004."),
    Document(text="In 2020 Acme opened a second factory, in Porto, employing 120 people."),
]


def with_policy(router: DifficultyRouter, policy: Policy) -> DifficultyRouter:
    """A router sharing the trained probes but with its own policy, so the session fixture stays untouched."""
    return DifficultyRouter(router.extractor, router.pool, router.probe, layers=router.layers, pooling=router.pooling,
                            capability=router.capability, policy=policy, difficulty_probe=router.difficulty_probe)


def smollm(extractor, tier: str, max_new_tokens: int) -> HuggingFaceLLM:
    return HuggingFaceLLM(
        model=extractor.model, tokenizer=extractor.tokenizer, model_name=f"smollm2-135m as {tier}",
        context_window=2048, max_new_tokens=max_new_tokens, device_map="cpu", is_chat_model=True,
        generate_kwargs={"do_sample": False}, stopping_ids=[extractor.tokenizer.eos_token_id],
    )


@pytest.fixture
def weak_llm(extractor):
    return smollm(extractor, "weak", 4)


@pytest.fixture
def strong_llm(extractor):
    return smollm(extractor, "strong", 6)


@pytest.fixture
def cheapest_router(trained_router):
    """tau = 0: the cheapest model always qualifies, so the weak tier gets every call."""
    return with_policy(trained_router, Policy("threshold", 0.0))


@pytest.fixture(scope="module")
def p_weak(trained_router) -> dict[str, list[float]]:
    """The trained probes' P(weak model answers right) for every easy and every hard query."""
    return {group: [d.probabilities[WEAK] for d in trained_router.route_batch(queries, progress=False)]
            for group, queries in (("easy", EASY_QUERIES), ("hard", HARD_QUERIES))}


@pytest.fixture(scope="module")
def split_router(trained_router):
    """The trained router at an operating point midway between the median P(weak succeeds) of 8 easy
    and 8 hard calibration queries, none of which the tests ask: whether each test query then lands on
    the tier its group should is up to the probes; test_easy_and_hard_queries_go_to_different_models
    checks it."""
    assert not set(EASY_CALIBRATION + HARD_CALIBRATION) & set(EASY_QUERIES + HARD_QUERIES)
    median = {name: statistics.median(d.probabilities[WEAK]
                                      for d in trained_router.route_batch(queries, progress=False))
              for name, queries in (("easy", EASY_CALIBRATION), ("hard", HARD_CALIBRATION))}
    return with_policy(trained_router, Policy("threshold", (median["easy"] + median["hard"]) / 2))


def _served_tiers(recorder: Recorder) -> list[str]:
    """Which candidate actually generated, from LlamaIndex's own LLM events."""
    return [e.model_dict["model_name"] for e in recorder.named("LLMChatStartEvent")]


# -- engines ---------------------------------------------------------------------------------
def test_summary_index_query_engine(cheapest_router, weak_llm, strong_llm, recorder):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    engine = SummaryIndex.from_documents(DOCS).as_query_engine(llm=llm, response_mode="compact")
    response = engine.query("Where was Acme founded?")
    assert str(response).strip() == recorder.named("LLMChatEndEvent")[-1].response.message.content.strip()
    routes = recorder.named("DifficultyRouteEvent")
    assert len(routes) == 1 and routes[0].model == WEAK
    assert _served_tiers(recorder) == ["smollm2-135m as weak"]
    sent = recorder.named("LLMChatStartEvent")[0].messages
    text = "\n".join(m.content or "" for m in sent)
    assert "Lyon" in text and "Porto" in text and "Where was Acme founded?" in text  # context reached the model
    assert len(response.source_nodes) == 3


def test_vector_index_query_engine_with_mock_embeddings(cheapest_router, weak_llm, strong_llm, recorder):
    # MockEmbedding: no embedding model can be downloaded here; retrieval is not what is under test.
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    index = VectorStoreIndex.from_documents(DOCS, embed_model=MockEmbedding(embed_dim=8))
    response = index.as_query_engine(llm=llm, similarity_top_k=2).query("Where is the second factory?")
    assert str(response).strip() and len(response.source_nodes) == 2
    assert [e.model for e in recorder.named("DifficultyRouteEvent")] == [WEAK]


def test_chat_engine_routes_on_the_whole_history(cheapest_router, weak_llm, strong_llm, recorder):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    engine = SimpleChatEngine.from_defaults(llm=llm)
    engine.chat("My name is Ada and I study topology.")
    engine.chat("What is my name?")
    routes = recorder.named("DifficultyRouteEvent")
    assert len(routes) == 2
    sent = recorder.named("LLMChatStartEvent")[-1].messages
    assert any("My name is Ada" in (m.content or "") for m in sent)
    whole = cheapest_router.route(to_router_messages(sent))
    last_only = cheapest_router.route("What is my name?")
    assert routes[1].decision["probabilities"] == pytest.approx(whole.probabilities)
    assert routes[1].decision["probabilities"] != pytest.approx(last_only.probabilities, abs=1e-6)


def test_settings_llm(cheapest_router, weak_llm, strong_llm, recorder):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    previous = Settings._llm
    try:
        Settings.llm = llm
        response = SummaryIndex.from_documents(DOCS[:1]).as_query_engine().query("When was Acme founded?")
    finally:
        Settings._llm = previous
    assert str(response).strip()
    assert [e.model for e in recorder.named("DifficultyRouteEvent")] == [WEAK]


# -- agents ----------------------------------------------------------------------------------
def test_function_agent_calls_a_tool_through_the_routed_llm(cheapest_router, weak_llm, llama_tool_backends, recorder):
    """A FunctionAgent on the routed LLM: the step goes to the tool-calling tier (a real llama.cpp
    tool-calling server) although the policy (tau = 0) prefers the cheap one, the agent runs the tool the
    model named with the arguments it chose, and the tool's output is the agent's answer.

    Two llama-cpp-python limits shape the run: streamed tool calls repeat the tool's name in every
    delta, which LlamaIndex concatenates ("get_weatherget_weather..."), so the agent runs unstreamed
    (``streaming=False``); and the server rejects the next step's assistant tool-call turn
    (``content: null``, HTTP 500), so the tool returns directly instead of going back to the model.
    ``initial_tool_choice`` names the tool, which the server's grammar then forces.
    """
    calls: list = []

    def get_weather(city: str) -> str:
        """Report the current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    tools_tier = OpenAILike(api_base=llama_tool_backends["large"], model="large", api_key="none", is_chat_model=True,
                            is_function_calling_model=True, max_tokens=16, temperature=0, max_retries=0, timeout=60,
                            context_window=2048)
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: tools_tier})
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(get_weather, return_direct=True)], llm=llm,
                          streaming=False, initial_tool_choice="get_weather")

    async def run():
        return await agent.run(user_msg="What is the weather in Paris?")

    result = asyncio.run(run())
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert str(result) == f"Sunny in {calls[0]}"
    assert [t.tool_name for t in result.tool_calls] == ["get_weather"]
    routes = recorder.named("DifficultyRouteEvent")
    assert [(r.model, r.operation) for r in routes] == [(STRONG, "achat_with_tools")]
    assert routes[0].decision["skipped"] == {WEAK: CANNOT_CALL_TOOLS}
    assert [e.model_dict["model_name"] for e in recorder.named("LLMChatStartEvent")] == ["large"]


class ScriptedReAct(CustomLLM):
    """A ReAct-format tier, scripted: it asks for the ``add`` tool once, then answers with what the tool observed.

    No real part here can play it. SmolLM2-135M does not write the ReAct format unaided, and with
    that format forced by a GBNF grammar on the llama.cpp server (Thought, then either
    ``Action: add`` with integer arguments or ``Answer:``) it answers at once without the tool
    ("What is 2 + 2?" -> "Answer: 2") or asks for the tool until max_iterations, depending on the
    wording; a grammar that forced the right step each time would be this script again.
    """

    prompts: list = []

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=8192, num_output=64, is_chat_model=False, model_name="scripted-react")

    def _reply(self, prompt: str) -> str:
        self.prompts.append(prompt)
        conversation = prompt.split("## Current Conversation")[-1]  # the header explains the format itself
        if "Observation:" in conversation:
            observed = conversation.rsplit("Observation:", 1)[1].strip().split()[0]
            return f"Thought: I can answer without using any more tools.\nAnswer: {observed}"
        return 'Thought: I need to use a tool to help me answer the question.\nAction: add\nAction Input: {"a": 2, "b": 2}'

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._reply(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        text = self._reply(prompt)

        def gen():
            yield CompletionResponse(text=text, delta=text)

        return gen()


def test_react_agent_runs_on_the_routed_llm(cheapest_router, strong_llm, recorder):
    added: list = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        added.append((a, b))
        return a + b

    react = ScriptedReAct(prompts=[])
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: react, STRONG: strong_llm})
    agent = ReActAgent(tools=[FunctionTool.from_defaults(add)], llm=llm)

    async def run():
        return await agent.run(user_msg="What is 2 + 2? Use the tool.")

    result = asyncio.run(run())
    assert added == [(2, 2)]
    assert str(result).strip().endswith("4")
    routes = recorder.named("DifficultyRouteEvent")
    assert len(routes) == 2 and all(r.model == WEAK for r in routes)
    assert "Observation: 4" in react.prompts[-1].split("## Current Conversation")[-1]  # the second step saw the whole exchange, tool result included


# -- RouterQueryEngine with DifficultySelector ----------------------------------------------
def test_router_query_engine_picks_the_tier_the_router_decides(split_router, weak_llm, strong_llm, recorder):
    index = SummaryIndex.from_documents(DOCS[:1])
    tools = [
        QueryEngineTool.from_defaults(index.as_query_engine(llm=weak_llm), description="Cheap answers."),
        QueryEngineTool.from_defaults(index.as_query_engine(llm=strong_llm), description="Careful answers."),
    ]
    selector = DifficultySelector(router=split_router, choice_models=[WEAK, STRONG])
    engine = RouterQueryEngine(selector=selector, query_engine_tools=tools, llm=weak_llm)

    easy = engine.query(EASY)
    hard = engine.query(HARD)
    assert easy.metadata["selector_result"].inds == [0]
    assert hard.metadata["selector_result"].inds == [1]
    assert _served_tiers(recorder) == ["smollm2-135m as weak", "smollm2-135m as strong"]
    reason = hard.metadata["selector_result"].reason
    assert STRONG in reason and "P(success)" in reason and f"{WEAK}=" in reason

    later = asyncio.run(engine.aquery(HARD))
    assert later.metadata["selector_result"].inds == [1]
    assert [e.model for e in recorder.named("DifficultyRouteEvent")] == [WEAK, STRONG, STRONG]


def test_selector_excludes_tiers_without_a_choice_and_checks_its_input(trained_router):
    strongest_only = DifficultySelector(router=with_policy(trained_router, Policy("threshold", 0.0)),
                                        choice_models=[STRONG])
    result = strongest_only.select(["Careful answers."], EASY)  # tau = 0 would pick WEAK, which has no choice
    assert result.inds == [0] and STRONG in result.reason
    with pytest.raises(ValueError, match="given 2 choices but ties 1"):
        strongest_only.select(["a", "b"], EASY)
    with pytest.raises(ValueError, match=r"names \['gpt-5'\], which are not in the router's pool"):
        DifficultySelector(router=trained_router, choice_models=[WEAK, "gpt-5"])
    with pytest.raises(ValueError, match="ties .* to more than one choice"):
        DifficultySelector(router=trained_router, choice_models=[WEAK, WEAK])
    with pytest.raises(TypeError, match="list of pool names"):
        DifficultySelector(router=trained_router, choice_models=WEAK)


def test_easy_and_hard_queries_go_to_different_models(p_weak, split_router, weak_llm, strong_llm, recorder):
    """The probes rate the weak model likelier to answer easy factual/arithmetic questions than hard
    multi-step ones, and a policy set between easy and hard calibration queries (split_router: none
    of them asked here) routes most easy test queries to the weak model and most hard ones to the
    strong one."""
    from llama_index.core.base.llms.types import ChatMessage

    easy, hard = p_weak["easy"], p_weak["hard"]
    assert statistics.mean(easy) > statistics.mean(hard) + 0.1, f"P(weak right): easy {easy}, hard {hard}"
    assert statistics.median(easy) > statistics.median(hard)

    llm = DifficultyRouterLLM(router=split_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    records = {q: llm.chat([ChatMessage(role="user", content=q)]).additional_kwargs[ROUTING_KEY]
               for q in EASY_QUERIES + HARD_QUERIES}
    to_weak = sum(records[q]["served_by"] == WEAK for q in EASY_QUERIES)
    to_strong = sum(records[q]["served_by"] == STRONG for q in HARD_QUERIES)
    assert to_weak > len(EASY_QUERIES) / 2 and to_strong > len(HARD_QUERIES) / 2, (
        to_weak, to_strong, split_router.policy, p_weak)
    # the tier each record names is the one LlamaIndex saw generate
    tier = {WEAK: "smollm2-135m as weak", STRONG: "smollm2-135m as strong"}
    assert _served_tiers(recorder) == [tier[records[q]["served_by"]] for q in EASY_QUERIES + HARD_QUERIES]
    tolerance = proba_atol(split_router)  # routed alone here, in a batch for p_weak
    assert all(records[q]["decision"]["probabilities"][WEAK] == pytest.approx(p, abs=tolerance) for q, p in zip(EASY_QUERIES, easy))
