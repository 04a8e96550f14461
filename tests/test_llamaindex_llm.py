"""DifficultyRouterLLM over real local models: SmolLM2-135M behind llama-index-llms-huggingface.

Both pool names are served by HuggingFaceLLM over the session's real SmolLM2 (the same
weights the extractor reads, greedy, a few new tokens); they differ in max_new_tokens and
model_name so the tier that served a call is visible in LlamaIndex's own events. Outages,
server errors and tool calls use LlamaIndex's OpenAILike client on real llama.cpp servers
(SmolLM2-135M GGUF): a shut-down server for an outage, a server killed mid-stream, the
``chatml-function-calling`` backends for tool calls. One fake stays, said so: ``SilentLLM``, an empty
stream no real OpenAI-compatible server sends.
"""

from __future__ import annotations

import asyncio

import openai
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
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.huggingface import HuggingFaceLLM
from llama_index.llms.openai_like import OpenAILike
from llama_servers import RUNNING, dead_url, llama_server, smollm2_gguf
from llamaindex_events import Recorder

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


def openai_like(base_url: str, alias: str, *, max_tokens: int = 8, is_chat_model: bool = True) -> OpenAILike:
    """A real pool LLM: LlamaIndex's OpenAI-compatible client on a llama.cpp server (greedy, no client retries)."""
    return OpenAILike(api_base=base_url, model=alias, api_key="none", is_chat_model=is_chat_model,
                      is_function_calling_model=True, max_tokens=max_tokens, temperature=0, max_retries=0, timeout=60,
                      context_window=2048)


@pytest.fixture(scope="module")
def stopped_backend() -> str:
    """The base URL of a real llama.cpp server that has been shut down: connections are refused, as in an outage."""
    with llama_server(smollm2_gguf(), "down") as base_url:
        pass
    return base_url


@pytest.fixture
def down_llm(stopped_backend) -> OpenAILike:
    """A real client whose provider is down."""
    return openai_like(stopped_backend, "down")


def served(recorder: "Recorder") -> list[str]:
    """Which candidates generated (their model_name), from LlamaIndex's own LLM start events."""
    return [e.model_dict["model_name"] for e in recorder.events
            if type(e).__name__ in ("LLMChatStartEvent", "LLMCompletionStartEvent")]

# -- construction and metadata ---------------------------------------------------------------
def test_metadata_is_what_every_candidate_can_take(cheapest_router, weak_llm, strong_llm):
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm})
    meta = llm.metadata
    assert meta.context_window == 2048  # the smaller of 2048 and 4096
    assert meta.num_output == 6  # room for the longest answer
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is False  # HuggingFaceLLM cannot call tools
    assert WEAK in meta.model_name and STRONG in meta.model_name

    completion_only = openai_like(dead_url(), "large", is_chat_model=False)  # a real tool-calling client
    tools = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: completion_only})
    assert tools.metadata.is_function_calling_model is True  # one candidate can call tools
    assert tools.metadata.is_chat_model is False  # not every candidate is a chat model


def test_construction_errors_name_the_problem(cheapest_router, weak_llm, strong_llm):
    with pytest.raises(ValueError, match=r"has nothing for the pool model\(s\) \['gpt-4-1106-preview'\]"):
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
    assert record["chosen"] == WEAK and record["served_by"] == WEAK and not record["escalated"]
    whole = cheapest_router.route(to_router_messages(conversation))
    last_only = cheapest_router.route(conversation[-1].content)
    assert record["decision"]["probabilities"] == pytest.approx(whole.probabilities)
    assert record["decision"]["probabilities"] != pytest.approx(last_only.probabilities, abs=1e-6)
    assert record["decision"]["difficulty"] == pytest.approx(whole.difficulty)
    assert record["decision"]["expected_cost"] == pytest.approx(whole.expected_cost)
    assert record["decision"]["fallbacks"] == [STRONG]
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
    assert all(c.additional_kwargs[ROUTING_KEY]["chosen"] == WEAK for c in chat_chunks)


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
OUTAGE = "APIConnectionError: Connection error."


def test_escalates_to_the_next_more_capable_model_on_an_outage(cheapest_router, down_llm, strong_llm, recorder):
    """A real outage of the chosen provider (connection refused) moves every call form to the next
    more capable model, and the response says so."""
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down_llm, STRONG: strong_llm})
    response = llm.chat(QUESTION)
    record = response.additional_kwargs[ROUTING_KEY]
    assert record["chosen"] == WEAK and record["served_by"] == STRONG
    assert [(a["model"], a["error"]) for a in record["attempts"] if a["outcome"] == "failed"] == [(WEAK, OUTAGE)]
    assert response.message.content == strong_llm.chat(QUESTION).message.content
    escalations = recorder.of(DifficultyEscalationEvent)
    assert [(e.failed_model, e.next_model, e.error) for e in escalations] == [(WEAK, STRONG, OUTAGE)]

    chunks = list(llm.stream_chat(QUESTION))  # fails before its first token: escalated too
    assert len(chunks) >= 2 and all(c.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG for c in chunks)
    assert chunks[-1].message.content == response.message.content

    async def run():
        done = await llm.acomplete("The capital of France is")
        streamed = [c async for c in await llm.astream_chat(QUESTION)]
        return done, streamed

    done, streamed = asyncio.run(run())
    assert done.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG
    assert [(a["model"], a["error"]) for a in done.additional_kwargs[ROUTING_KEY]["attempts"] if a["outcome"] == "failed"] == [(WEAK, OUTAGE)]
    assert streamed[-1].message.content == response.message.content
    assert all(c.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG for c in streamed)
    assert [e.operation for e in recorder.of(DifficultyEscalationEvent)] == ["chat", "stream_chat", "acomplete",
                                                                           "astream_chat"]


def test_escalate_false_hands_the_outage_to_the_caller(cheapest_router, down_llm, strong_llm, recorder):
    """escalate=False: the chosen provider's own error reaches the caller and no other model runs."""
    import openai

    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down_llm, STRONG: strong_llm}, escalate=False)
    with pytest.raises(openai.APIConnectionError) as info:
        llm.chat(QUESTION)
    assert any("every eligible model failed" in note and WEAK in note and STRONG not in note
               for note in info.value.__notes__)
    with pytest.raises(openai.APIConnectionError):
        list(llm.stream_chat(QUESTION))

    async def run():
        with pytest.raises(openai.APIConnectionError):
            await llm.achat(QUESTION)
        with pytest.raises(openai.APIConnectionError):
            await llm.astream_complete("The capital of France is")

    asyncio.run(run())
    assert "smollm2-135m as strong" not in served(recorder)
    assert [(e.failed_model, e.next_model) for e in recorder.of(DifficultyEscalationEvent)] == [(WEAK, None)] * 4

    # the same outage with escalation on (the default): served by the strong tier
    on = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down_llm, STRONG: strong_llm})
    assert on.chat(QUESTION).additional_kwargs[ROUTING_KEY]["served_by"] == STRONG


def test_a_stream_that_breaks_after_its_first_chunk_is_the_callers(cheapest_router, strong_llm, recorder):
    """Text already streamed cannot be taken back: when the chosen server dies mid-stream (a real
    llama.cpp server killed after two chunks), the error reaches the caller and nothing escalates."""
    import httpx

    with llama_server(smollm2_gguf(), "doomed") as base_url:
        doomed = openai_like(base_url, "doomed", max_tokens=256)
        llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: doomed, STRONG: strong_llm})
        stream = llm.stream_chat([ChatMessage(role="user", content="Tell me a long story about a dragon.")])
        first = next(stream)
        next(stream)  # a second chunk: the stream is under way
        assert first.additional_kwargs[ROUTING_KEY]["served_by"] == WEAK
        RUNNING[base_url][1].kill()  # the provider crashes while it is still generating
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            list(stream)
    assert recorder.of(DifficultyEscalationEvent) == []
    assert "smollm2-135m as strong" not in served(recorder)


def test_an_error_from_the_strongest_model_comes_back_with_what_was_tried(trained_router, weak_llm, down_llm):
    """The strongest model has no fallback: its own exception is raised, noted with every candidate tried."""
    import openai

    strongest = with_policy(trained_router, Policy("threshold", 1.0))
    llm = DifficultyRouterLLM(router=strongest, llms={WEAK: weak_llm, STRONG: down_llm})
    with pytest.raises(openai.APIConnectionError) as info:
        llm.chat(QUESTION)
    assert any("every eligible model failed" in note and STRONG in note for note in info.value.__notes__)


#: A tool-call turn as LlamaIndex agents record it. LlamaIndex sends the assistant turn with
#: ``"content": null`` (valid OpenAI), which llama-cpp-python's server rejects with HTTP 500.
TOOL_TURN = [
    ChatMessage(role="user", content="What is the weather in Paris?"),
    ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}),
    ChatMessage(role="tool", content="Sunny in Paris", additional_kwargs={"tool_call_id": "c1"}),
    ChatMessage(role="user", content="So do I need an umbrella?"),
]


def test_escalates_on_a_server_error_in_every_call_form(cheapest_router, llama_backends, llama_tool_backends,
                                                        strong_llm, recorder):
    """An HTTP 500 from a running backend escalates in the sync, async and streaming forms.

    Both errors are real llama-cpp-python server errors: it answers HTTP 500 to an assistant
    tool-call turn with ``content: null`` (what LlamaIndex sends), and its ``chatml-function-calling``
    handler answers HTTP 500 to ``tool_choice="required"`` (``tool_required=True``) when not streamed
    (streamed, it answers 200 with an empty body, so the tool forms are checked unstreamed here).
    """
    weak = openai_like(llama_backends["small"], "small")
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak, STRONG: strong_llm})
    expected = strong_llm.chat(TOOL_TURN).message.content
    assert expected

    response = llm.chat(TOOL_TURN)
    record = response.additional_kwargs[ROUTING_KEY]
    assert record["chosen"] == WEAK and record["served_by"] == STRONG
    assert record["attempts"][0]["error"].startswith("InternalServerError: Error code: 500")
    assert response.message.content == expected
    chunks = list(llm.stream_chat(TOOL_TURN))
    assert chunks[-1].message.content == expected
    assert all(c.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG for c in chunks)

    async def run():
        one = await llm.achat(TOOL_TURN)
        streamed = [c async for c in await llm.astream_chat(TOOL_TURN)]
        return one, streamed

    one, streamed = asyncio.run(run())
    assert one.message.content == expected and one.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG
    assert streamed[-1].message.content == expected
    assert all(c.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG for c in streamed)

    tool = _weather_tool([])
    tools_llm = DifficultyRouterLLM(router=cheapest_router, llms={
        WEAK: openai_like(llama_tool_backends["small"], "small"), STRONG: openai_like(llama_backends["large"], "large")})
    ask = dict(user_msg="What is the weather in Paris?", tool_required=True)
    sync_tools = tools_llm.chat_with_tools([tool], **ask)
    async_tools = asyncio.run(tools_llm.achat_with_tools([tool], **ask))
    for r in (sync_tools, async_tools):
        assert r.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG
        assert r.additional_kwargs[ROUTING_KEY]["attempts"][0]["error"].startswith("InternalServerError: Error code: 500")
    assert sync_tools.message.content and async_tools.message.content == sync_tools.message.content
    assert [(e.failed_model, e.next_model, e.operation) for e in recorder.of(DifficultyEscalationEvent)] == [
        (WEAK, STRONG, op) for op in ("chat", "stream_chat", "achat", "astream_chat", "chat_with_tools",
                                      "achat_with_tools")]


def test_a_bug_in_a_tool_is_not_escalated(cheapest_router, llama_tool_backends, recorder):
    """A programming error (a tool raising KeyError, surfaced by predict_and_call(error_on_tool_error=True))
    is the caller's: it propagates from the first model, the tool runs once, nothing escalates."""
    calls: list = []

    def lookup(city: str) -> str:
        """Look a city up in the table of capitals."""
        calls.append(city)
        return {}[city]  # the bug

    llm = DifficultyRouterLLM(router=cheapest_router, llms={
        WEAK: openai_like(llama_tool_backends["small"], "small"), STRONG: openai_like(llama_tool_backends["large"], "large")})
    with pytest.raises(ValueError, match="Encountered error"):
        llm.predict_and_call([FunctionTool.from_defaults(lookup)], user_msg="Is Paris a capital?", tool_choice="lookup",
                             error_on_tool_error=True)
    assert len(calls) == 1
    assert recorder.of(DifficultyEscalationEvent) == []


def test_a_misspelt_argument_is_not_escalated(cheapest_router, llama_backends, recorder):
    """A TypeError raised by the client for an argument it does not take (a bug in the calling code)
    reaches the caller from the first model, without trying the others."""
    llm = DifficultyRouterLLM(router=cheapest_router, llms={
        WEAK: openai_like(llama_backends["small"], "small"), STRONG: openai_like(llama_backends["large"], "large")})
    with pytest.raises(TypeError, match="temprature"):
        llm.chat(QUESTION, temprature=0.5)
    assert recorder.of(DifficultyEscalationEvent) == []


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
    weak_llm.callback_manager = CallbackManager([])
    owned = weak_llm.callback_manager
    assert count(routed) == expected
    assert weak_llm.callback_manager is owned  # the user's own LLM object is left as it was


# -- function calling ------------------------------------------------------------------------
def _weather_tool(calls: list) -> FunctionTool:
    def get_weather(city: str) -> str:
        """Report the current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    return FunctionTool.from_defaults(get_weather)


def assert_weather_call(selections) -> None:
    """One call of get_weather with arguments valid for its schema (SmolLM2 picks the values; they are not checked)."""
    assert [s.tool_name for s in selections] == ["get_weather"]
    assert set(selections[0].tool_kwargs) == {"city"} and isinstance(selections[0].tool_kwargs["city"], str)


ASK_WEATHER = dict(user_msg="What is the weather in Paris?", tool_choice="get_weather")


def test_tool_calls_skip_candidates_that_cannot_call_tools(cheapest_router, weak_llm, llama_tool_backends):
    """Tool calls go to a candidate that can call tools (a real llama.cpp tool-calling server) even when
    the policy prefers one that cannot; the call, its parse and the tool's result come back in every form.

    ``tool_choice`` names the tool: the backend's grammar then forces that tool (``"required"`` is HTTP 500
    there), which checks that the adapter hands the caller's keyword arguments to the candidate.
    """
    calls: list = []
    tool = _weather_tool(calls)
    strong = openai_like(llama_tool_backends["large"], "large", max_tokens=16)
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong})
    response = llm.chat_with_tools([tool], **ASK_WEATHER)
    record = response.additional_kwargs[ROUTING_KEY]
    # tau = 0 would pick the cheap tier, but it cannot call tools
    assert record["chosen"] == STRONG and record["served_by"] == STRONG and record["decision"]["skipped"] == {WEAK: CANNOT_CALL_TOOLS}
    assert_weather_call(llm.get_tool_calls_from_response(response))

    result = llm.predict_and_call([tool], **ASK_WEATHER)
    assert len(calls) == 1 and result.response == f"Sunny in {calls[0]}"  # the tool ran on the model's arguments
    assert result.metadata[ROUTING_KEY]["served_by"] == STRONG

    async def run():
        one = await llm.achat_with_tools([tool], **ASK_WEATHER)
        chunks = [c async for c in await llm.astream_chat_with_tools([tool], **ASK_WEATHER)]
        called = await llm.apredict_and_call([tool], **ASK_WEATHER)
        return one, chunks, called

    one, chunks, called = asyncio.run(run())
    assert_weather_call(llm.get_tool_calls_from_response(one))
    assert len(calls) == 2 and called.response == f"Sunny in {calls[1]}"
    assert called.metadata[ROUTING_KEY]["served_by"] == STRONG
    # Streams: llama-cpp-python repeats the tool name in every delta and LlamaIndex's OpenAI client
    # concatenates them ("get_weatherget_weather..."), so the routed stream is compared with the
    # candidate's own stream rather than with the tool's name.
    direct = strong.stream_chat_with_tools([tool], **ASK_WEATHER)
    *_, direct_last = direct
    expected = [(s.tool_name, s.tool_kwargs) for s in strong.get_tool_calls_from_response(direct_last)]
    sync_chunks = list(llm.stream_chat_with_tools([tool], **ASK_WEATHER))
    for stream in (sync_chunks, chunks):
        assert all(c.additional_kwargs[ROUTING_KEY]["served_by"] == STRONG for c in stream)
        assert [(s.tool_name, s.tool_kwargs) for s in llm.get_tool_calls_from_response(stream[-1])] == expected

    with pytest.raises(ValueError, match="did not come from this DifficultyRouterLLM"):
        llm.get_tool_calls_from_response(strong.chat_with_tools([tool], **ASK_WEATHER))
    response.additional_kwargs[ROUTING_KEY]["served_by"] = WEAK  # the parse follows served_by
    with pytest.raises(ValueError, match="served by 'mistralai/Mixtral-8x7B-Instruct-v0.1', which is not a function"):
        llm.get_tool_calls_from_response(response)
    no_tools = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: weak_llm})
    with pytest.raises(ValueError, match="none of the llms .* can call tools"):
        no_tools.chat_with_tools([tool], user_msg="Weather?")


def test_a_tool_call_escalates_from_a_tool_tier_that_is_down(cheapest_router, down_llm, llama_tool_backends, recorder):
    """Two tool-calling tiers: the chosen one is down (connection refused), the next one makes the call
    and parses it, and predict_and_call runs the tool once."""
    calls: list = []
    tool = _weather_tool(calls)
    strong = openai_like(llama_tool_backends["large"], "large", max_tokens=16)
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down_llm, STRONG: strong})
    response = llm.chat_with_tools([tool], **ASK_WEATHER)
    record = response.additional_kwargs[ROUTING_KEY]
    assert record["decision"]["skipped"] == {} and record["chosen"] == WEAK  # both can call tools: the policy's choice stands
    assert record["served_by"] == STRONG and [(a["model"], a["error"]) for a in record["attempts"] if a["outcome"] == "failed"] == [(WEAK, OUTAGE)]
    assert_weather_call(llm.get_tool_calls_from_response(response))
    result = llm.predict_and_call([tool], **ASK_WEATHER)
    assert len(calls) == 1 and result.response == f"Sunny in {calls[0]}"
    assert [e.operation for e in recorder.of(DifficultyEscalationEvent)] == ["chat_with_tools", "predict_and_call"]


class SilentLLM(CustomLLM):
    """A fake candidate, said so: every real OpenAI-compatible server sends at least one chunk, so a
    provider's empty stream (a content filter, a zero-token answer) is staged with LlamaIndex's own
    CustomLLM base. Its streams skip LlamaIndex's callback decorators, whose end event cannot
    describe a stream that yielded nothing."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="silent")

    def complete(self, prompt, formatted=False, **kwargs):
        return CompletionResponse(text="")

    def stream_complete(self, prompt, formatted=False, **kwargs):
        yield from ()

    def stream_chat(self, messages, **kwargs):
        yield from ()

    async def astream_complete(self, prompt, formatted=False, **kwargs):
        return _no_chunks()

    async def astream_chat(self, messages, **kwargs):
        return _no_chunks()


async def _no_chunks():
    return
    yield


def test_an_empty_stream_still_carries_the_routing_record(cheapest_router, strong_llm):
    """The caller still gets one empty response carrying the decision: chat and completion, sync and async."""
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: SilentLLM(), STRONG: strong_llm})

    async def both_async():
        chat = [c async for c in await llm.astream_chat(QUESTION)]
        done = [c async for c in await llm.astream_complete("The capital of France is")]
        return chat, done

    chat, done = list(llm.stream_chat(QUESTION)), list(llm.stream_complete("The capital of France is"))
    for chunks in (chat, done, *asyncio.run(both_async())):
        assert len(chunks) == 1 and chunks[0].delta == ""
        assert chunks[0].additional_kwargs[ROUTING_KEY]["served_by"] == WEAK
    assert chat[0].message.content == "" and done[0].text == ""


def test_escalate_on_and_retries_are_the_same_options_as_langchain(cheapest_router, down_llm, strong_llm):
    """escalate_on= narrows the rule (a connection error no longer escalates); max_retries= asks the
    same candidate again first (three real refused connections, then the strong model)."""
    narrow = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down_llm, STRONG: strong_llm},
                                 escalate_on=TimeoutError)
    with pytest.raises(openai.APIConnectionError):
        narrow.chat(QUESTION)
    retrying = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: down_llm, STRONG: strong_llm}, max_retries=2)
    record = retrying.chat(QUESTION).additional_kwargs[ROUTING_KEY]
    assert [(a["model"], a["outcome"]) for a in record["attempts"]] == [(WEAK, "failed")] * 3 + [(STRONG, "accepted")]


# -- shadow mode ------------------------------------------------------------------------------
def test_shadow_mode_serves_the_default_and_logs_the_would_be_choice(cheapest_router, weak_llm, strong_llm,
                                                                       recorder, tmp_path):
    """The router would send every call to WEAK (tau = 0); in shadow mode STRONG serves them all,
    in every call form, and the record and the decision log keep WEAK as the would-be choice."""
    from difficulty_router import DecisionLog, read_log

    log = tmp_path / "decisions.jsonl"
    llm = DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm},
                              shadow=STRONG, decision_log=DecisionLog(log))
    done = llm.chat(QUESTION)
    chunks = list(llm.stream_complete("The capital of France is"))
    assert done.message.content == strong_llm.chat(QUESTION).message.content
    for record in (done.additional_kwargs[ROUTING_KEY], chunks[-1].additional_kwargs[ROUTING_KEY]):
        assert record["mode"] == "shadow" and record["served_by"] == STRONG
        assert record["shadow"]["would_be"] == WEAK and record["shadow"]["default"] == STRONG
    assert served(recorder).count(strong_llm.model_name) >= 2 and weak_llm.model_name not in served(recorder)
    rows = list(read_log(log))
    assert [(r["chosen"], r["served_by"]) for r in rows] == [(WEAK, STRONG), (WEAK, STRONG)]
    with pytest.raises(ValueError, match="shadow='nobody' is not among"):
        DifficultyRouterLLM(router=cheapest_router, llms={WEAK: weak_llm, STRONG: strong_llm}, shadow="nobody")
