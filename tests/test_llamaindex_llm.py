"""DifficultyRouterLLM over real local models: SmolLM2-135M behind llama-index-llms-huggingface.

Both pool names are served by HuggingFaceLLM over the session's real SmolLM2 (the same
weights the extractor reads, greedy, a few new tokens); they differ in max_new_tokens and
model_name so the tier that served a call is visible in LlamaIndex's own events. Fakes appear
only where a real local model cannot do the job, and each says why.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    CompletionResponse,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.huggingface import HuggingFaceLLM

from difficulty_router import DifficultyRouter, Policy
from llamaindex_difficulty_router import (
    CANNOT_CALL_TOOLS,
    ROUTING_KEY,
    DifficultyEscalationEvent,
    DifficultyRouteEvent,
    DifficultyRouterLLM,
    to_router_messages,
)

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]


def with_policy(router: DifficultyRouter, policy: Policy) -> DifficultyRouter:
    """A router sharing the trained probes but with its own policy, so the session fixture stays untouched."""
    return DifficultyRouter(router.extractor, router.pool, router.probe, layers=router.layers, pooling=router.pooling,
                            capability=router.capability, policy=policy, difficulty_probe=router.difficulty_probe)


def smollm(extractor, tier: str, max_new_tokens: int, context_window: int = 2048) -> HuggingFaceLLM:
    return HuggingFaceLLM(
        model=extractor.model, tokenizer=extractor.tokenizer, model_name=f"smollm2-135m as {tier}",
        context_window=context_window, max_new_tokens=max_new_tokens, device_map="cpu", is_chat_model=True,
        generate_kwargs={"do_sample": False}, stopping_ids=[extractor.tokenizer.eos_token_id],
    )


@pytest.fixture
def weak_llm(extractor):
    return smollm(extractor, "weak", max_new_tokens=4, context_window=2048)


@pytest.fixture
def strong_llm(extractor):
    return smollm(extractor, "strong", max_new_tokens=6, context_window=4096)


@pytest.fixture
def cheapest_router(trained_router):
    """tau = 0: the cheapest model always qualifies, so the weak tier gets every call."""
    return with_policy(trained_router, Policy("threshold", 0.0))


class Recorder(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)

    def names(self) -> Counter:
        return Counter(type(e).__name__ for e in self.events)

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]


@pytest.fixture
def recorder():
    root = get_dispatcher()
    rec = Recorder(events=[])
    root.add_event_handler(rec)
    yield rec
    root.event_handlers.remove(rec)


class OutageLLM(CustomLLM):
    """A provider that is down. A local model cannot be made to fail on demand, so this is a fake.

    ``fail_after`` chunks are streamed before the stream breaks (None: fail before any output).
    """

    calls: int = 0
    fail_after: Any = None

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=8192, num_output=8, is_chat_model=True, model_name="outage")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.calls += 1
        raise ConnectionError("provider unreachable")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        self.calls += 1
        if self.fail_after is None:
            raise ConnectionError("provider unreachable")

        def gen():
            for i in range(self.fail_after):
                yield CompletionResponse(text="x" * (i + 1), delta="x")
            raise ConnectionError("connection reset mid-stream")

        return gen()


# -- construction and metadata ---------------------------------------------------------------
def test_metadata_is_what_every_candidate_can_take(cheapest_router, weak_llm, strong_llm):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    meta = llm.metadata
    assert meta.context_window == 2048  # the smaller of 2048 and 4096
    assert meta.num_output == 6  # room for the longest answer
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is False  # HuggingFaceLLM cannot call tools
    assert WEAK in meta.model_name and STRONG in meta.model_name

    tools = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: MockFunctionCallingLLM()})
    assert tools.metadata.is_function_calling_model is True
    assert tools.metadata.is_chat_model is False  # MockFunctionCallingLLM says it is not a chat model


def test_construction_errors_name_the_problem(cheapest_router, weak_llm, strong_llm):
    with pytest.raises(ValueError, match=r"no LLM for the pool models \['gpt-4-1106-preview'\]"):
        DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm})
    with pytest.raises(ValueError, match=r"names \['gpt-4'\], which are not in the router's pool"):
        DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm, "gpt-4": strong_llm})
    with pytest.raises(TypeError, match=r"llms\['gpt-4-1106-preview'\] must be a llama_index LLM, got str"):
        DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: "gpt-4"})
    with pytest.raises(TypeError, match="llms must be a mapping"):
        DifficultyRouterLLM(router=cheapest_router, llms=[weak_llm, strong_llm])
    with pytest.raises(TypeError, match="router must be a difficulty_router.DifficultyRouter"):
        DifficultyRouterLLM(router="router", llms={WEAK: weak_llm, STRONG: strong_llm})
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    with pytest.raises(ValueError, match="messages is empty"):
        llm.chat([])
    with pytest.raises(TypeError, match=r"messages\[0\] must be a ChatMessage, got dict"):
        llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match="prompt must be a str, got list"):
        llm.complete(["hi"])


# -- conversion ------------------------------------------------------------------------------
def test_conversation_conversion_keeps_every_turn_and_tool_calls():
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", blocks=[TextBlock(text="Look at this"), ImageBlock(image=b"\x89PNG", image_mimetype="image/png")]),
        ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="1", tool_name="zoom", tool_kwargs={"x": 2})]),
        ChatMessage(role="tool", content="zoomed", additional_kwargs={"tool_call_id": "1"}),
        ChatMessage(role=MessageRole.CHATBOT, content="It is a cat."),
    ]
    out = to_router_messages(messages)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "assistant"]
    assert out[1]["content"] == "Look at this"  # the image has no text to read
    assert out[2]["tool_calls"] == [{"function": {"name": "zoom", "arguments": {"x": 2}}}]
    assert out[3]["content"] == "zoomed"
    openai_style = ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": '{"x": 3}'}}]})
    assert to_router_messages([openai_style])[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 3}'


# -- chat, completion, streaming, async on the real model -----------------------------------
def test_chat_routes_the_whole_conversation_and_delegates(cheapest_router, trained_router, weak_llm, strong_llm,
                                                          recorder):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    conversation = [
        ChatMessage(role="system", content="You are a terse assistant."),
        ChatMessage(role="user", content="Prove that there are infinitely many primes p with p = 3 mod 4."),
        ChatMessage(role="assistant", content="Assume finitely many and consider 4 p1 ... pk - 1."),
        ChatMessage(role="user", content="Thanks. And 2 + 2?"),
    ]
    response = llm.chat(conversation)
    record = response.additional_kwargs[ROUTING_KEY]
    assert record["model"] == WEAK and record["served_by"] == WEAK and record["escalations"] == {}
    whole = cheapest_router.route(to_router_messages(conversation))
    last_only = cheapest_router.route(conversation[-1].content)
    assert record["probabilities"] == pytest.approx(whole.probabilities)
    assert record["probabilities"] != pytest.approx(last_only.probabilities, abs=1e-6)
    assert 1.0 <= record["difficulty"] <= 5.0 and record["expected_cost"] == pytest.approx(whole.expected_cost)
    assert record["fallbacks"] == [STRONG]
    # the weak tier's own answer, token for token (greedy decoding)
    assert response.message.content == weak_llm.chat(conversation).message.content
    assert response.message.content
    assert ROUTING_KEY not in response.message.additional_kwargs  # the message goes back into histories
    starts = [e for e in recorder.events if type(e).__name__ == "LLMChatStartEvent"]
    assert starts[0].model_dict["model_name"] == "smollm2-135m as weak"


def test_complete_and_streams_deliver_the_chosen_models_tokens(cheapest_router, weak_llm, strong_llm):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    done = llm.complete("The capital of France is")
    assert done.text and done.additional_kwargs[ROUTING_KEY]["served_by"] == WEAK
    assert done.text == weak_llm.complete("The capital of France is").text

    chunks = list(llm.stream_complete("The capital of France is"))
    assert len(chunks) >= 2  # tokens arrive one by one, not as one final block
    assert "".join(c.delta for c in chunks) == chunks[-1].text
    assert all(c.additional_kwargs[ROUTING_KEY]["served_by"] == WEAK for c in chunks)

    chat_chunks = list(llm.stream_chat(QUESTION))
    assert len(chat_chunks) >= 2
    assert "".join(c.delta for c in chat_chunks) == chat_chunks[-1].message.content
    assert chat_chunks[-1].message.content == weak_llm.chat(QUESTION).message.content
    assert all(c.additional_kwargs[ROUTING_KEY]["model"] == WEAK for c in chat_chunks)


def test_async_forms(cheapest_router, weak_llm, strong_llm):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})

    async def run():
        chat = await llm.achat(QUESTION)
        done = await llm.acomplete("The capital of France is")
        chat_chunks = [c async for c in await llm.astream_chat(QUESTION)]
        done_chunks = [c async for c in await llm.astream_complete("The capital of France is")]
        return chat, done, chat_chunks, done_chunks

    chat, done, chat_chunks, done_chunks = asyncio.run(run())
    assert chat.message.content == weak_llm.chat(QUESTION).message.content
    assert chat.additional_kwargs[ROUTING_KEY]["served_by"] == WEAK
    assert done.text and done.additional_kwargs[ROUTING_KEY]["served_by"] == WEAK
    assert chat_chunks and chat_chunks[-1].message.content == chat.message.content
    assert done_chunks and done_chunks[-1].text == done.text
    assert all(ROUTING_KEY in c.additional_kwargs for c in chat_chunks + done_chunks)


# -- escalation ------------------------------------------------------------------------------
def test_escalates_to_the_next_more_capable_model(cheapest_router, strong_llm, recorder):
    down = OutageLLM()
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down, STRONG: strong_llm})
    response = llm.chat(QUESTION)
    record = response.additional_kwargs[ROUTING_KEY]
    assert record["model"] == WEAK and record["served_by"] == STRONG
    assert record["escalations"] == {WEAK: "ConnectionError: provider unreachable"}
    assert response.message.content == strong_llm.chat(QUESTION).message.content
    escalations = recorder.of(DifficultyEscalationEvent)
    assert [(e.failed_model, e.next_model) for e in escalations] == [(WEAK, STRONG)]

    chunks = list(llm.stream_chat(QUESTION))  # fails before its first token: escalated too
    assert chunks[-1].additional_kwargs[ROUTING_KEY]["served_by"] == STRONG

    done = asyncio.run(llm.acomplete("The capital of France is"))
    assert done.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG
    assert down.calls == 3


def test_no_escalation_when_disabled_or_mid_stream_or_nothing_left(cheapest_router, trained_router, strong_llm):
    down = OutageLLM()
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down, STRONG: strong_llm}, escalate=False)
    with pytest.raises(ConnectionError, match="provider unreachable"):
        llm.chat(QUESTION)

    # text already streamed cannot be taken back, so a break after the first chunk is the caller's
    breaking = OutageLLM(fail_after=2)
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: breaking, STRONG: strong_llm})
    stream = llm.stream_complete("hello")
    assert next(stream).text == "x"
    with pytest.raises(ConnectionError, match="mid-stream"):
        list(stream)

    # the strongest model has no fallback: its error comes back with what was tried
    strongest = with_policy(trained_router, Policy("threshold", 1.0))
    llm = DifficultyRouterLLM(router=strongest, llms={WEAK: strong_llm, STRONG: OutageLLM()})
    with pytest.raises(ConnectionError) as info:
        llm.chat(QUESTION)
    assert any("every candidate failed" in note and STRONG in note for note in info.value.__notes__)


# -- instrumentation -------------------------------------------------------------------------
def test_instrumentation_has_one_set_of_llm_events_and_the_decision(cheapest_router, weak_llm, strong_llm, recorder):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    prompt = PromptTemplate("Answer briefly: {q}")
    weak_llm.predict(prompt, q="What is the capital of France?")
    direct = recorder.names()
    recorder.events.clear()
    llm.predict(prompt, q="What is the capital of France?")
    routed = recorder.names()
    assert routed.pop("DifficultyRouteEvent") == 1
    assert routed == direct  # the same LLM events as calling the chosen model directly, none doubled
    route_event = recorder.of(DifficultyRouteEvent)[0]
    assert route_event.model == WEAK and route_event.operation == "chat"
    assert set(route_event.decision["probabilities"]) == {WEAK, STRONG}


def test_token_counts_are_not_doubled(extractor, cheapest_router, weak_llm, strong_llm):
    def count(run):
        counter = TokenCountingHandler(tokenizer=extractor.tokenizer.encode)
        run(CallbackManager([counter]))
        return counter.prompt_llm_token_count, counter.completion_llm_token_count, len(counter.llm_token_counts)

    def direct(cm):
        weak_llm.callback_manager = cm
        weak_llm.chat(QUESTION)

    def routed(cm):
        llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
        llm.callback_manager = cm  # as query engines and Settings do: handed on to the candidates
        llm.chat(QUESTION)

    expected = count(direct)
    assert expected[0] > 0
    assert count(routed) == expected


# -- function calling ------------------------------------------------------------------------
def _weather_tool(calls: list) -> FunctionTool:
    def get_weather(city: str = "Paris") -> str:
        """Report the current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    return FunctionTool.from_defaults(get_weather)


def test_tool_calls_skip_candidates_that_cannot_call_tools(cheapest_router, weak_llm):
    # SmolLM2-135M cannot emit tool calls, so the tool-calling tier is LlamaIndex's MockFunctionCallingLLM,
    # which calls each tool with its default arguments.
    calls: list = []
    tool = _weather_tool(calls)
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: MockFunctionCallingLLM()})
    response = llm.chat_with_tools([tool], user_msg="Weather in Paris?")
    record = response.additional_kwargs[ROUTING_KEY]
    # tau = 0 would pick the cheap tier, but it cannot call tools
    assert record["model"] == STRONG and record["skipped"] == {WEAK: CANNOT_CALL_TOOLS}
    selections = llm.get_tool_calls_from_response(response)
    assert [(s.tool_name, s.tool_kwargs) for s in selections] == [("get_weather", {"city": "Paris"})]

    result = llm.predict_and_call([tool], user_msg="Weather in Paris?")
    assert result.response == "Sunny in Paris" and calls == ["Paris"]
    assert result.metadata[ROUTING_KEY]["served_by"] == STRONG

    async def run():
        one = await llm.achat_with_tools([tool], user_msg="Weather?")
        chunks = [c async for c in await llm.astream_chat_with_tools([tool], user_msg="Weather?")]
        called = await llm.apredict_and_call([tool], user_msg="Weather?")
        return one, chunks, called

    one, chunks, called = asyncio.run(run())
    sync_chunks = list(llm.stream_chat_with_tools([tool], user_msg="Weather?"))
    assert llm.get_tool_calls_from_response(sync_chunks[-1])[0].tool_kwargs == {"city": "Paris"}
    assert llm.get_tool_calls_from_response(one)[0].tool_name == "get_weather"
    assert llm.get_tool_calls_from_response(chunks[-1])[0].tool_name == "get_weather"
    assert called.response == "Sunny in Paris"

    with pytest.raises(ValueError, match="did not come from this DifficultyRouterLLM"):
        llm.get_tool_calls_from_response(MockFunctionCallingLLM().chat_with_tools([tool], user_msg="x"))
    no_tools = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: weak_llm})
    with pytest.raises(ValueError, match="none of the candidates .* can call tools"):
        no_tools.chat_with_tools([tool], user_msg="Weather?")


def test_the_chosen_function_calling_model_parses_its_own_tool_calls(cheapest_router):
    # Two tool-calling tiers (mocks: no local model here can call tools) that answer differently,
    # so the parse must come from the tier that answered.
    calls: list = []
    tool = _weather_tool(calls)
    weak = MockFunctionCallingLLM(response_generator=lambda messages, **kw: ChatMessage(
        role="assistant", blocks=[ToolCallBlock(tool_call_id="w", tool_name="get_weather", tool_kwargs={"city": "Oslo"})]))
    strong = MockFunctionCallingLLM(response_generator=lambda messages, **kw: ChatMessage(
        role="assistant", blocks=[ToolCallBlock(tool_call_id="s", tool_name="get_weather", tool_kwargs={"city": "Rome"})]))
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak, STRONG: strong})
    response = llm.chat_with_tools([tool], user_msg="Weather?")
    assert response.additional_kwargs[ROUTING_KEY]["skipped"] == {}
    assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(response)] == [{"city": "Oslo"}]
    assert llm.predict_and_call([tool], user_msg="Weather?").response == "Sunny in Oslo"

    def broken(messages, **kw):
        raise TimeoutError("tool endpoint timed out")

    failing = DifficultyRouterLLM(router=cheapest_router,
                                  llms={WEAK: MockFunctionCallingLLM(response_generator=broken), STRONG: strong})
    response = failing.chat_with_tools([tool], user_msg="Weather?")
    assert response.additional_kwargs[ROUTING_KEY]["escalations"] == {WEAK: "TimeoutError: tool endpoint timed out"}
    assert [s.tool_kwargs for s in failing.get_tool_calls_from_response(response)] == [{"city": "Rome"}]
