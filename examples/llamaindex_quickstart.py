"""LlamaIndex quickstart: a trained difficulty router as the LLM of a query engine and of an agent,
and as the selector of a RouterQueryEngine.

Runs offline on the embedded SmolLM2-135M (no API key, no hub): the router is trained on the
shipped RouteLLM MMLU sample, and both "pool models" are local SmolLM2 chat models standing in
for Mixtral (cheap) and GPT-4 (strong), differing only in how many tokens they may write. In
production, put OpenAI(...) / Anthropic(...) / ... in ``llms=`` under the pool's names.

    pip install -e '.[dev]'   # llama-index-llms-huggingface
    python examples/llamaindex_quickstart.py
"""

from __future__ import annotations

import asyncio
import copy

from llama_index.core import Document, Settings, SummaryIndex
from llama_index.core.agent.workflow import ReActAgent
from llama_index.core.llms import ChatMessage
from llama_index.core.query_engine import RouterQueryEngine
from llama_index.core.tools import FunctionTool, QueryEngineTool
from llama_index.llms.huggingface import HuggingFaceLLM

from difficulty_router import ActivationExtractor, ModelPool, Policy, load_outcomes, train_router
from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE
from llamaindex_difficulty_router import ROUTING_KEY, DifficultyRouterLLM, DifficultySelector


def local_llm(extractor: ActivationExtractor, tier: str, max_new_tokens: int) -> HuggingFaceLLM:
    # A copy of the weights: the extractor reads activations through hooks on its own model,
    # which must not fire inside a generation running in a streaming thread.
    model, tokenizer = copy.deepcopy(extractor.model), copy.deepcopy(extractor.tokenizer)
    return HuggingFaceLLM(
        model=model,
        tokenizer=tokenizer,
        model_name=f"smollm2-135m as {tier}",
        context_window=2048,
        max_new_tokens=max_new_tokens,
        device_map="cpu",
        is_chat_model=True,
        generate_kwargs={"do_sample": False},
        stopping_ids=[tokenizer.eos_token_id],
    )


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def main() -> None:
    extractor = ActivationExtractor("smollm2-135m", layers=15, pooling="last")
    print("training the router on 400 rows of the shipped RouteLLM MMLU sample (a minute or two on a CPU)...")
    outcomes = load_outcomes(ROUTELLM_MMLU_SAMPLE).subset(range(400))
    router = train_router(
        outcomes, ModelPool.load(ROUTELLM_MMLU_POOL), extractor, layers=[15], pooling="last", cv=3, progress=False
    )
    weak, strong = router.capability_order()[0], router.capability_order()[-1]
    easy = "What is 2 + 3?"
    hard = (
        "Let f be holomorphic on the unit disk with |f| <= 1 and f(0) = 0. "
        "Find the largest possible |f'(1/2)| and prove it."
    )
    # Demo only: put the operating point between the two queries so both pool models get traffic.
    # On real traffic, use router.calibrate(outcomes, max_accuracy_drop=0.01) instead.
    p = [router.route(q).probabilities[weak] for q in (easy, hard)]
    router.policy = Policy("threshold", sum(p) / 2)
    llms = {weak: local_llm(extractor, "weak", 16), strong: local_llm(extractor, "strong", 48)}
    llm = DifficultyRouterLLM(router=router, llms=llms)  # checks every pool name has an LLM
    Settings.llm = llm  # everything below that needs an LLM gets the routed one

    docs = [
        Document(text="Acme Corp was founded in 1999 in Lyon. It makes bicycle parts."),
        Document(text="In 2020 Acme opened a second factory, in Porto, employing 120 people."),
    ]
    index = SummaryIndex.from_documents(docs)  # no embeddings: none can be downloaded offline

    print("\n1) a query engine over a SummaryIndex, streaming the chosen model's tokens")
    for question in ("Where was Acme founded?", "Prove that Acme's Porto headcount is prime or composite."):
        response = index.as_query_engine(streaming=True).query(question)
        text = "".join(response.response_gen)
        print(f"   {question!r}\n      -> {text.strip()!r}")

    print("\n2) the decision on each response (chat)")
    for question in (easy, hard):
        reply = llm.chat([ChatMessage(role="user", content=question)])
        record = reply.additional_kwargs[ROUTING_KEY]
        d = record["decision"]
        print(
            f"   {record['served_by']:40s} difficulty {d['difficulty']:.1f}/5 "
            f"P(success)={ {k[:12]: round(v, 2) for k, v in d['probabilities'].items()} } "
            f"-> {reply.message.content.strip()!r}"
        )

    print("\n3) RouterQueryEngine: DifficultySelector ties each engine to a tier")
    engine = RouterQueryEngine(
        selector=DifficultySelector(router=router, choice_models=[weak, strong]),
        query_engine_tools=[
            QueryEngineTool.from_defaults(index.as_query_engine(llm=llms[weak]), description="quick answers"),
            QueryEngineTool.from_defaults(index.as_query_engine(llm=llms[strong]), description="careful answers"),
        ],
    )
    for question in (easy, hard):
        result = engine.query(question).metadata["selector_result"]
        print(f"   engine {result.ind} for {question[:40]!r}: {result.reason}")

    print("\n4) a ReAct agent on the routed LLM (SmolLM2-135M rarely follows ReAct, so it may answer directly)")
    # Greedy decoding makes the run deterministic. A reply without "Action:" is taken as the final answer;
    # a malformed step goes back to the model to fix, and a tool's own error comes back to it as the
    # observation (LlamaIndex's handling). max_iterations bounds those rounds, and
    # early_stopping_method="generate" asks for a final answer once they are spent (the default, "force",
    # raises WorkflowRuntimeError). Anything else that fails (the router, a backend LLM) raises.
    agent = ReActAgent(tools=[FunctionTool.from_defaults(add)], llm=llm, early_stopping_method="generate")

    async def ask():
        return await agent.run(user_msg="What is 20 + 22? Use the add tool.", max_iterations=3)

    answer = asyncio.run(ask())
    calls = [f"{c.tool_name}({c.tool_kwargs}) -> {c.tool_output.content}" for c in answer.tool_calls]
    print(f"   {str(answer).strip()!r}; tool calls: {calls or 'none (answered directly)'}")


if __name__ == "__main__":
    main()
