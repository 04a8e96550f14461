"""LangChain adapter: standard langchain_tests suites plus chain, agent, streaming and escalation tests.

Real pieces: the router (real SmolLM2 extractor, real probes trained on RouteLLM MMLU rows)
and, as pool chat models, langchain-huggingface's ChatHuggingFace over a local SmolLM2
text-generation pipeline (greedy, a few new tokens). SmolLM2-135M cannot call tools, so the
tool, agent and structured-output tests use small scripted fakes; each says so.
"""

from __future__ import annotations

import copy
import threading

import httpx
import openai
import pytest
from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables.router import RouterRunnable
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel, Field

from difficulty_router import Policy
from langchain_difficulty_router import ChatDifficultyRouter, DifficultyRouterRunnable, route_to, to_router_query

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


# --------------------------------------------------------------------------------------
# Real local chat models
# --------------------------------------------------------------------------------------
def _local_chat_class():
    from langchain_huggingface import ChatHuggingFace

    class LocalChatHuggingFace(ChatHuggingFace):
        """ChatHuggingFace raises NotImplementedError for async on local pipelines; use
        BaseChatModel's defaults, which run the sync path in a worker thread."""

        _agenerate = BaseChatModel._agenerate
        _astream = BaseChatModel._astream

    return LocalChatHuggingFace


@pytest.fixture(scope="session")
def local_chat_models(extractor):
    """Two real SmolLM2 chat models (short and longer answers) sharing one model copy.

    The copy matters: the extractor captures activations with forward hooks on its own
    model, and generation must not run through those hooks.
    """
    from langchain_huggingface import HuggingFacePipeline
    from transformers import pipeline

    model = copy.deepcopy(extractor.model)
    cls = _local_chat_class()
    out = {}
    for name, new_tokens in ((WEAK, 6), (STRONG, 10)):
        tokenizer = copy.deepcopy(extractor.tokenizer)  # fast tokenizers are not safe to share across threads
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, max_new_tokens=new_tokens,
                        do_sample=False, return_full_text=False)
        llm = HuggingFacePipeline(pipeline=pipe, model_id=SMOL)
        out[name] = cls(llm=llm, tokenizer=tokenizer, model_id=SMOL)
    return out


@pytest.fixture
def router(trained_router, monkeypatch):
    """The session router; tests that move its operating point get it restored afterwards."""
    monkeypatch.setattr(trained_router, "policy", trained_router.policy)
    return trained_router


# --------------------------------------------------------------------------------------
# Fakes, only where a real local model cannot do the job
# --------------------------------------------------------------------------------------
class ScriptedToolModel(BaseChatModel):
    """A tool-calling chat model (SmolLM2-135M cannot produce tool calls).

    With tools bound and no tool result yet, it calls the first tool with ``tool_args``;
    otherwise it answers ``"<label>: <last message text>"``. Every call is recorded.
    """

    label: str = "scripted"
    tool_args: dict = Field(default_factory=dict)
    usage: dict | None = None
    calls: list = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-model"

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], tool_choice=tool_choice, **kwargs)

    def _reply(self, messages, stop, kwargs) -> AIMessage:
        self.calls.append({"messages": messages, "stop": stop, "kwargs": kwargs})
        tools = kwargs.get("tools") or []
        if tools and not isinstance(messages[-1], ToolMessage):
            name = tools[0]["function"]["name"]
            return AIMessage(content="", tool_calls=[{"name": name, "args": self.tool_args, "id": f"call_{len(self.calls)}"}],
                             usage_metadata=self.usage, response_metadata={"model_name": self.label})
        return AIMessage(content=f"{self.label}: {messages[-1].text}", usage_metadata=self.usage,
                         response_metadata={"model_name": self.label})

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages, stop, kwargs))])


class GatedStreamModel(BaseChatModel):
    """Streams two chunks and waits between them until the consumer has seen the first:
    if anything between the model and the caller buffered, the gate would never open."""

    gate: threading.Event = Field(default_factory=threading.Event)
    model_config = {"arbitrary_types_allowed": True}

    @property
    def _llm_type(self) -> str:
        return "gated-stream"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="first second"))])

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        yield ChatGenerationChunk(message=AIMessageChunk(content="first "))
        if not self.gate.wait(timeout=20):
            raise AssertionError("the consumer never received the first chunk: the stream was buffered")
        yield ChatGenerationChunk(message=AIMessageChunk(content="second"))


class FailingModel(BaseChatModel):
    """Always raises ``error`` (a provider outage cannot be staged with a local model)."""

    error: BaseException
    model_config = {"arbitrary_types_allowed": True}

    @property
    def _llm_type(self) -> str:
        return "failing"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        raise self.error

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        raise self.error
        yield  # pragma: no cover


def rate_limit() -> openai.RateLimitError:
    response = httpx.Response(429, request=httpx.Request("POST", "https://api.example/v1/chat/completions"))
    return openai.RateLimitError("rate limited", response=response, body=None)


# --------------------------------------------------------------------------------------
# Standard suites
# --------------------------------------------------------------------------------------
# The suites' async tests carry no async marker (they expect an auto mode); anyio runs them on asyncio.
@pytest.mark.anyio
class TestStandardUnit(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _pool(self, trained_router, local_chat_models):
        type(self)._params = {"router": trained_router, "models": dict(local_chat_models)}

    @property
    def chat_model_class(self):
        return ChatDifficultyRouter

    @property
    def chat_model_params(self):
        return self._params


@pytest.mark.anyio
class TestStandardIntegration(ChatModelIntegrationTests):
    """Over two real local SmolLM2 chat models (ChatHuggingFace pipelines).

    Capability flags are those of that pool: no tool calling or structured output
    (SmolLM2-135M cannot), and ChatHuggingFace reports no token usage for local pipelines.
    Tool calling through the router is covered with scripted fakes further down.
    """

    @pytest.fixture(autouse=True)
    def _pool(self, trained_router, local_chat_models):
        type(self)._params = {"router": trained_router, "models": dict(local_chat_models)}

    @property
    def chat_model_class(self):
        return ChatDifficultyRouter

    @property
    def chat_model_params(self):
        return self._params

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def returns_usage_metadata(self):
        return False


# --------------------------------------------------------------------------------------
# Construction and conversion
# --------------------------------------------------------------------------------------
def test_unknown_or_missing_pool_names_fail_at_construction(router, local_chat_models):
    with pytest.raises(ValueError, match="no runnable is registered") as exc:
        DifficultyRouterRunnable(router, runnables={WEAK: local_chat_models[WEAK]})
    assert STRONG in str(exc.value)
    with pytest.raises(ValueError, match=STRONG):
        route_to(router, {WEAK: local_chat_models[WEAK], "gpt-5": local_chat_models[STRONG]})
    with pytest.raises(ValueError, match="no chat model given"):
        ChatDifficultyRouter(router=router, models={WEAK: local_chat_models[WEAK]})
    with pytest.raises(ValueError, match="not in the router's pool"):
        ChatDifficultyRouter(router=router, models={**local_chat_models, "gpt-5": local_chat_models[STRONG]})
    with pytest.raises(TypeError, match="DifficultyRouter"):
        ChatDifficultyRouter(router="my-router", models=local_chat_models)


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="int"):
        to_router_query(42)
    with pytest.raises(ValueError, match="empty"):
        to_router_query([])


def test_router_reads_the_whole_conversation(router, monkeypatch):
    """Scripted pool models: ChatHuggingFace refuses ToolMessages; what matters here is what the router reads."""
    seen = []
    real_route = router.route
    monkeypatch.setattr(router, "route", lambda q, **kw: seen.append(q) or real_route(q, **kw))
    chat = ChatDifficultyRouter(router=router, models={WEAK: ScriptedToolModel(label="w"),
                                                       STRONG: ScriptedToolModel(label="s")})
    conversation = [
        SystemMessage("You are a terse tutor of organic chemistry."),
        HumanMessage("What does SN2 stand for?"),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"term": "SN2"}, "id": "c1"}]),
        ToolMessage("bimolecular nucleophilic substitution", tool_call_id="c1"),
        AIMessage("Bimolecular nucleophilic substitution."),
        HumanMessage("And why does it invert stereochemistry?"),
    ]
    out = chat.invoke(conversation)
    assert [m["role"] for m in seen[0]] == ["system", "user", "assistant", "tool", "assistant", "user"]
    full = real_route(to_router_query(conversation)).probabilities
    last_turn = real_route("And why does it invert stereochemistry?").probabilities
    assert out.response_metadata["difficulty_router"]["probabilities"] == pytest.approx(full)
    assert full != pytest.approx(last_turn)  # the history changed what the router read


# --------------------------------------------------------------------------------------
# DifficultyRouterRunnable + RouterRunnable over real local models
# --------------------------------------------------------------------------------------
@pytest.fixture
def routed_chain(router, local_chat_models):
    prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{question}")])
    step = DifficultyRouterRunnable(router, runnables=local_chat_models)
    return prompt, step, prompt | step | RouterRunnable(runnables=dict(local_chat_models))


def test_router_runnable_chain_invoke_and_batch(routed_chain, router, monkeypatch):
    prompt, step, chain = routed_chain
    value = prompt.invoke({"question": "What is the capital of France?"})
    routed = step.invoke(value)
    assert set(routed) == {"key", "input"} and routed["input"] is value
    assert routed["key"] == router.route(to_router_query(value)).model
    assert isinstance(chain.invoke({"question": "What is the capital of France?"}), AIMessage)

    calls = []
    real = router.route_batch
    monkeypatch.setattr(router, "route_batch", lambda qs, **kw: calls.append(len(qs)) or real(qs, **kw))
    questions = [{"question": q} for q in ("2+2?", "Name a prime number.", "Prove Fermat's last theorem.")]
    outs = chain.batch(questions)
    assert len(outs) == 3 and all(isinstance(o, AIMessage) and o.content for o in outs)
    assert calls == [3]  # one batched extraction for the whole batch


@pytest.mark.asyncio
async def test_router_runnable_chain_async_and_stream(routed_chain, router, monkeypatch):
    _, _, chain = routed_chain
    chunks = list(chain.stream({"question": "Say hello."}))
    assert len(chunks) > 1 and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert isinstance(await chain.ainvoke({"question": "Say hello."}), AIMessage)
    achunks = [c async for c in chain.astream({"question": "Say hello."})]
    assert len(achunks) > 1
    calls = []
    real = router.route_batch
    monkeypatch.setattr(router, "route_batch", lambda qs, **kw: calls.append(len(qs)) or real(qs, **kw))
    outs = await chain.abatch([{"question": "1+1?"}, {"question": "Define entropy."}])
    assert len(outs) == 2 and calls == [2]


# --------------------------------------------------------------------------------------
# ChatDifficultyRouter
# --------------------------------------------------------------------------------------
def test_easy_and_hard_queries_are_routed_differently(router, local_chat_models):
    """Real extractor and probes. The probe must rank the easy query as likelier to be
    solved by the weak model; the operating point is then set between the two scores
    (a threshold policy), which is what calibration does on real traffic."""
    easy = "What is 2 + 3?"
    hard = ("Let f be a holomorphic function on the unit disk with |f(z)| <= 1 and f(0) = 0. Using the "
            "Schwarz-Pick lemma, determine the maximum possible value of |f'(1/2)| and justify every step.")
    p_easy, p_hard = (router.route(q).probabilities[WEAK] for q in (easy, hard))
    assert p_easy > p_hard
    router.policy = Policy("threshold", (p_easy + p_hard) / 2)
    chat = ChatDifficultyRouter(router=router, models=local_chat_models)
    out_easy, out_hard = chat.batch([easy, hard])
    meta_easy = out_easy.response_metadata["difficulty_router"]
    meta_hard = out_hard.response_metadata["difficulty_router"]
    assert (meta_easy["chosen"], meta_hard["chosen"]) == (WEAK, STRONG)
    assert meta_easy["difficulty"] < meta_hard["difficulty"]
    assert set(meta_easy["probabilities"]) == {WEAK, STRONG} and meta_easy["expected_cost"] > 0


@pytest.mark.asyncio
async def test_astream_events_order_and_no_duplicates(router, local_chat_models):
    chat = ChatDifficultyRouter(router=router, models=local_chat_models)
    events = [e async for e in chat.astream_events("Name a colour.", version="v2")]
    kinds = [e["event"] for e in events]
    router_run = events[0]["run_id"]
    assert kinds[0] == "on_chat_model_start" and kinds[-1] == "on_chat_model_end"
    child_start = kinds.index("on_chain_start")
    child_end = kinds.index("on_chain_end")
    streams = [i for i, k in enumerate(kinds) if k == "on_chat_model_stream"]
    assert streams and child_start < streams[0] and streams[-1] < child_end
    chosen = events[-1]["data"]["output"].response_metadata["difficulty_router"]["chosen"]
    assert events[child_start]["name"] == chosen and f"difficulty_router:{chosen}" in events[child_start]["tags"]
    assert kinds.count("on_chat_model_start") == 1  # the pool model's own run is not reported twice
    assert all(events[i]["run_id"] == router_run for i in streams)
    streamed = "".join(events[i]["data"]["chunk"].text for i in streams)
    assert streamed == events[-1]["data"]["output"].text and streamed


def test_stream_passes_tokens_as_they_arrive(router):
    gated = GatedStreamModel()
    chat = ChatDifficultyRouter(router=router, models={WEAK: gated, STRONG: gated})
    texts = []
    for chunk in chat.stream("Hello"):
        texts.append(chunk.text)
        gated.gate.set()
    assert "".join(texts) == "first second"


def test_usage_preserved_not_double_counted(router):
    usage = {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    pool = {WEAK: ScriptedToolModel(label="w", usage=usage), STRONG: ScriptedToolModel(label="s", usage=usage)}
    chat = ChatDifficultyRouter(router=router, models=pool)
    handler = UsageMetadataCallbackHandler()
    out = chat.invoke("What is 2 + 3?", config={"callbacks": [handler]})
    assert out.usage_metadata["total_tokens"] == 10
    assert sum(u["total_tokens"] for u in handler.usage_metadata.values()) == 10


def test_stop_and_call_kwargs_pass_through(router):
    pool = {WEAK: ScriptedToolModel(label="w"), STRONG: ScriptedToolModel(label="s")}
    chat = ChatDifficultyRouter(router=router, models=pool)
    out = chat.invoke("Count to five.", stop=["4"], seed=11)
    served = pool[out.response_metadata["difficulty_router"]["served_by"]]
    assert served.calls[-1]["stop"] == ["4"] and served.calls[-1]["kwargs"]["seed"] == 11


def test_real_stop_sequence_and_default_stop(router, local_chat_models):
    chat = ChatDifficultyRouter(router=router, models=local_chat_models, stop=["zzz"])
    assert isinstance(chat.invoke("Say hi.", stop=["."]), AIMessage)


def test_escalates_on_rate_limit_to_real_model(router, local_chat_models):
    """The weak model is a stand-in for a provider returning 429; the threshold 0 policy makes
    the router pick it (cheapest model with P >= 0) so the escalation path is exercised."""
    router.policy = Policy("threshold", 0.0)
    chat = ChatDifficultyRouter(router=router, models={WEAK: FailingModel(error=rate_limit()),
                                                       STRONG: local_chat_models[STRONG]})
    out = chat.invoke("What is 2 + 3?")
    meta = out.response_metadata["difficulty_router"]
    assert meta["chosen"] == WEAK and meta["served_by"] == STRONG and meta["escalated"]
    assert meta["attempts"][0]["model"] == WEAK and "RateLimitError" in meta["attempts"][0]["error"]
    assert out.content
    chunks = list(chat.stream("What is 2 + 3?"))
    assert chunks[0].response_metadata["difficulty_router"]["served_by"] == STRONG


@pytest.mark.asyncio
async def test_escalation_async_and_all_fail(router):
    router.policy = Policy("threshold", 0.0)
    ok = ScriptedToolModel(label="strong")
    chat = ChatDifficultyRouter(router=router, models={WEAK: FailingModel(error=TimeoutError("slow")), STRONG: ok})
    out = await chat.ainvoke("Hi")
    assert out.response_metadata["difficulty_router"]["served_by"] == STRONG
    both_down = ChatDifficultyRouter(router=router, models={WEAK: FailingModel(error=rate_limit()),
                                                            STRONG: FailingModel(error=ConnectionError("down"))})
    with pytest.raises(ConnectionError) as exc:
        await both_down.ainvoke("Hi")
    assert "every eligible model failed" in "".join(exc.value.__notes__)
    bug = ChatDifficultyRouter(router=router, models={WEAK: FailingModel(error=KeyError("bug")), STRONG: ok})
    with pytest.raises(KeyError):  # a programming error is not an outage: no escalation
        bug.invoke("Hi")


# --------------------------------------------------------------------------------------
# Tools, structured output, agents (scripted fakes: SmolLM2-135M cannot call tools)
# --------------------------------------------------------------------------------------
@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_bind_tools_rebinds_on_chosen_and_skips_tool_less_models(router):
    no_tools = GenericFakeChatModel(messages=iter([AIMessage("plain")]))  # implements no bind_tools
    strong = ScriptedToolModel(label="s", tool_args={"a": 2, "b": 3})
    chat = ChatDifficultyRouter(router=router, models={WEAK: no_tools, STRONG: strong})
    bound = chat.bind_tools([add], tool_choice="any")
    out = bound.invoke("What is 2 + 3? Use the tool.")
    meta = out.response_metadata["difficulty_router"]
    assert meta["served_by"] == STRONG and meta["skipped"] == {WEAK: "cannot call tools"}
    assert out.tool_calls[0]["name"] == "add" and out.tool_calls[0]["args"] == {"a": 2, "b": 3}
    assert strong.calls[-1]["kwargs"]["tools"][0]["function"]["name"] == "add"
    assert strong.calls[-1]["kwargs"]["tool_choice"] == "any"


def test_structured_output_through_router(router):
    class Sum(BaseModel):
        """The sum of two numbers."""

        total: int

    pool = {WEAK: ScriptedToolModel(label="w", tool_args={"total": 5}),
            STRONG: ScriptedToolModel(label="s", tool_args={"total": 5})}
    chat = ChatDifficultyRouter(router=router, models=pool)
    assert chat.with_structured_output(Sum).invoke("2 + 3?") == Sum(total=5)
    raw = chat.with_structured_output(Sum, include_raw=True).invoke("2 + 3?")
    assert raw["parsed"] == Sum(total=5) and "difficulty_router" in raw["raw"].response_metadata


def test_agent_loop_with_tool(router):
    from langchain.agents import create_agent

    strong = ScriptedToolModel(label="s", tool_args={"a": 20, "b": 22})
    chat = ChatDifficultyRouter(router=router, models={WEAK: GenericFakeChatModel(messages=iter([])), STRONG: strong})
    agent = create_agent(chat, tools=[add])
    result = agent.invoke({"messages": [HumanMessage("What is 20 + 22?")]})
    messages = result["messages"]
    assert isinstance(messages[-2], ToolMessage) and messages[-2].content == "42"
    assert messages[-1].content == "s: 42"
    assert all(m.response_metadata["difficulty_router"]["served_by"] == STRONG
               for m in messages if isinstance(m, AIMessage))


def test_from_router_dir(router, extractor, local_chat_models, tmp_path):
    router.save(tmp_path / "r")
    chat = ChatDifficultyRouter.from_router_dir(tmp_path / "r", models=local_chat_models, extractor=extractor)
    query = "What is the boiling point of water at sea level?"
    out = chat.invoke(query)
    assert out.response_metadata["difficulty_router"]["probabilities"] == pytest.approx(
        router.route(query).probabilities)
    with pytest.raises(FileNotFoundError):
        ChatDifficultyRouter.from_router_dir(tmp_path / "missing", models=local_chat_models, extractor=extractor)
