"""Extractor speed on this machine: prompts/s by batch size, early exit vs full pass, fp32 vs bf16, latency, RSS.

Prompts are the first ``--n`` questions of the shipped RouteLLM MMLU sample (real MMLU
questions, ~140 tokens each with the chat template). "full" runs every layer and
``output_hidden_states`` through the CausalLM (what a naive extractor does); "early exit"
stops after the read-out layer (the middle one). Run it on an otherwise idle machine.

Its "peak RSS (process, so far)" column is the whole process's high-water mark, the naive full pass's
logits (batch x tokens x 49,152 vocab in float32, gigabytes at batch 32) and every earlier extractor
included: that, not the extractor, is where the 5.7 GB it once reported came from. The extractor's
own peak, in a fresh process, is measured by ``benchmarks/overhead.py``.

    python benchmarks/extraction.py --models smollm2-135m:float32,bfloat16 qwen2.5-coder-0.5b:float32 --n 64
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from _common import machine, md_table, write_results

from difficulty_router import ActivationExtractor, load_outcomes
from difficulty_router.datasets import ROUTELLM_MMLU_SAMPLE


def full_forward(extractor: ActivationExtractor, queries, batch_size: int) -> None:
    """The baseline: a complete CausalLM forward with all hidden states, same batching and padding."""
    ids, _ = extractor.tokenize(queries)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = extractor.tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [ids[i] for i in order[start:start + batch_size]]
            longest = max(map(len, batch))
            input_ids = torch.tensor([[pad] * (longest - len(x)) + x for x in batch], device=extractor.device)
            mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in batch], device=extractor.device)
            extractor.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)


def rate(fn, n: int, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"],
                        help="MODEL or MODEL:DTYPE[,DTYPE] (default dtypes: --dtypes)")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--latency-queries", type=int, default=40)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    queries = load_outcomes(ROUTELLM_MMLU_SAMPLE).queries[: args.n]
    rows, payload = [], {"machine": machine(), "n": args.n, "results": []}
    for spec in args.models:
        model, _, dtypes = spec.partition(":")
        for dtype in dtypes.split(",") if dtypes else args.dtypes:
            extractor = ActivationExtractor(model, dtype=dtype, layers=0.5, pooling="last")
            layer = extractor.layers[0]
            extractor.extract(queries[:4], progress=False)  # warm-up
            # bf16 on a CPU without native bf16 is emulated and slow: one batch size shows the gap.
            for bs in ((1, 8, 32) if dtype == "float32" or extractor.device.type != "cpu" else (8,)):
                extractor.batch_size = bs
                early = rate(lambda e=extractor: e.extract(queries, progress=False), len(queries))
                full = rate(lambda e=extractor, b=bs: full_forward(e, queries, b), len(queries))
                rows.append([model, dtype, bs, f"{early:.1f}", f"{full:.1f}", f"{early / full:.2f}x", "", "", ""])
                print(rows[-1], flush=True)
                payload["results"].append({"model": model, "dtype": dtype, "batch_size": bs,
                                           "early_exit_prompts_per_s": early, "full_prompts_per_s": full})
            extractor.batch_size = 16
            lat = []
            for q in queries[: args.latency_queries]:
                start = time.perf_counter()
                extractor.extract([q], progress=False)
                lat.append((time.perf_counter() - start) * 1000)
            p50, p95 = np.percentile(lat, [50, 95])
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows[-1][6:] = [f"{p50:.0f}", f"{p95:.0f}", f"{rss:.0f}"]
            payload["results"].append({"model": model, "dtype": dtype, "single_query_ms_p50": p50,
                                       "single_query_ms_p95": p95, "peak_rss_mb_so_far": rss, "layer": layer})
    md = (f"Extraction on {machine()}; {args.n} MMLU prompts (mean ~140 tokens), read-out at the middle layer.\n\n"
          + md_table(["model", "dtype", "batch", "early exit prompts/s", "full pass prompts/s", "speed-up",
                      "1-query p50 ms", "1-query p95 ms", "peak RSS MB (process, so far)"], rows)
          + "\n\nGPU row (bf16, CUDA): pending; this session had no GPU machine.")
    write_results("extraction", md, payload)


if __name__ == "__main__":
    main()
