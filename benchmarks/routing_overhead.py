"""Decision latency of one routed query: extraction + probes + policy, per extractor, one query at a time.

    python benchmarks/routing_overhead.py --models smollm2-135m qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import machine, md_table, write_results

from difficulty_router import ActivationExtractor, ModelPool, load_outcomes, train_router
from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--train-rows", type=int, default=200)
    parser.add_argument("--queries", type=int, default=60)
    args = parser.parse_args()
    outcomes = load_outcomes(ROUTELLM_MMLU_SAMPLE)
    pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    train = outcomes.subset(range(args.train_rows))
    queries = outcomes.subset(range(args.train_rows, args.train_rows + args.queries)).queries
    rows, payload = [], {"machine": machine(), "results": []}
    for model in args.models:
        extractor = ActivationExtractor(model, max_tokens=512)
        router = train_router(train, pool, extractor, layers=[0.5], pooling="last", cv=3, progress=False)
        router.route(queries[0])  # warm-up
        total, inside = [], []
        for q in queries:
            start = time.perf_counter()
            decision = router.route(q)
            total.append((time.perf_counter() - start) * 1000)
            inside.append(decision.latency_ms)
        p50, p95 = np.percentile(total, [50, 95])
        rows.append([model, f"{extractor.n_layers} layers, read-out {router.layers[0]}", f"{p50:.0f}", f"{p95:.0f}"])
        payload["results"].append({"model": model, "p50_ms": p50, "p95_ms": p95, "layer": router.layers[0]})
    md = (f"Routing decision latency, one query at a time ({args.queries} MMLU questions, mean ~140 tokens), "
          f"on {machine()}.\n\n" + md_table(["extractor", "read-out", "p50 ms", "p95 ms"], rows))
    write_results("routing_overhead", md, payload)


if __name__ == "__main__":
    main()
