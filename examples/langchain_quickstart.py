"""LangChain quickstart: a trained difficulty router in an LCEL chain and as an agent's chat model.

Runs offline on the embedded SmolLM2-135M (no API key): the router is trained on the shipped
RouteLLM MMLU sample, and both "pool models" are local SmolLM2 chat models standing in for
Mixtral (cheap) and GPT-4 (strong), differing only in how many tokens they may write. In
production, put ChatOpenAI / ChatAnthropic / ... in ``models=`` under the pool's names.

    pip install -e '.[dev]'   # langchain, langchain-huggingface
    python examples/langchain_quickstart.py
"""

from __future__ import annotations

import copy

from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables.router import RouterRunnable
from langchain_core.tools import tool
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
from transformers import pipeline

from difficulty_router import ActivationExtractor, ModelPool, Policy, load_outcomes, train_router
from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE
from langchain_difficulty_router import ChatDifficultyRouter, DifficultyRouterRunnable


class LocalChat(ChatHuggingFace):
    """ChatHuggingFace refuses async on local pipelines; BaseChatModel's defaults run the sync path in a thread."""

    _agenerate = BaseChatModel._agenerate
    _astream = BaseChatModel._astream


def local_chat(extractor: ActivationExtractor, max_new_tokens: int) -> ChatHuggingFace:
    # A copy of the weights: the extractor reads activations through hooks on its own model.
    model, tokenizer = copy.deepcopy(extractor.model), copy.deepcopy(extractor.tokenizer)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                    do_sample=False, return_full_text=False)
    return LocalChat(llm=HuggingFacePipeline(pipeline=pipe, model_id=extractor.model_id), tokenizer=tokenizer,
                     model_id=extractor.model_id)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def main() -> None:
    extractor = ActivationExtractor("smollm2-135m", layers=15, pooling="last")
    # 400 of the 3000 shipped RouteLLM MMLU rows keep this demo to a minute or two on a laptop CPU;
    # train on all of them (or your own logged outcomes) for a better router.
    print("training the router on 400 shipped RouteLLM MMLU rows...")
    outcomes = load_outcomes(ROUTELLM_MMLU_SAMPLE).subset(range(400))
    router = train_router(outcomes, ModelPool.load(ROUTELLM_MMLU_POOL), extractor,
                          layers=[15], pooling="last", cv=3, progress=False)
    weak, strong = router.capability_order()[0], router.capability_order()[-1]
    easy, hard = "What is 2 + 3?", ("Let f be holomorphic on the unit disk with |f| <= 1 and f(0) = 0. "
                                    "Find the largest possible |f'(1/2)| and prove it.")
    # Demo only: put the operating point between the two queries so both pool models get traffic.
    # On real traffic, use router.calibrate(outcomes, max_accuracy_drop=0.01) instead.
    p = [router.route(q).probabilities[weak] for q in (easy, hard)]
    router.policy = Policy("threshold", sum(p) / 2)
    models = {weak: local_chat(extractor, 16), strong: local_chat(extractor, 48)}

    print("\n1) LCEL: prompt | DifficultyRouterRunnable | RouterRunnable")
    prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{question}")])
    step = DifficultyRouterRunnable(router, runnables=models)  # checks every pool name has a runnable
    chain = prompt | step | RouterRunnable(runnables=models)
    inputs = [{"question": easy}, {"question": hard}]
    keys = [routed["key"] for routed in (prompt | step).batch(inputs)]  # what the chain will pick
    for question, key, answer in zip((easy, hard), keys, chain.batch(inputs)):
        print(f"   {key:40s} <- {question[:50]!r}: {answer.content!r}")

    print("\n2) ChatDifficultyRouter as a chat model (streaming, decision in response_metadata)")
    chat = ChatDifficultyRouter(router=router, models=models)
    for query in (easy, hard):
        full = None
        for chunk in chat.stream(query):
            full = chunk if full is None else full + chunk
        record = full.response_metadata["difficulty_router"]
        decision = record["decision"]
        print(f"   {record['served_by']:40s} difficulty {decision['difficulty']:.1f}/5 "
              f"P(success)={ {k[:12]: round(v, 2) for k, v in decision['probabilities'].items()} } "
              f"-> {full.content!r}")

    print("\n3) as the model of a LangChain agent (SmolLM2 cannot call tools, so it answers directly)")
    from langchain.agents import create_agent

    agent = create_agent(chat, tools=[add], system_prompt="You can add numbers with the add tool.")
    result = agent.invoke({"messages": [("user", "What is 20 + 22?")]})
    last = result["messages"][-1]
    print(f"   {last.response_metadata['difficulty_router']['served_by']}: {last.content!r}")


if __name__ == "__main__":
    main()
