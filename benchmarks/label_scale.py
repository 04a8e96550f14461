"""Labelling throughput: ``difficulty-router label`` in one process vs ``--engine ray``, same calls, same servers.

    python benchmarks/label_scale.py [--prompts 32] [--repeats 2]

The pool is two real llama.cpp servers (tests/llama_servers.py: llama-cpp-python on the embedded
SmolLM2-135M GGUF, one thread each) answering short arithmetic questions greedily in at most 8 tokens,
graded by the ``number`` grader. Each run labels every prompt with both models into a fresh output
(no resume), ``--concurrency`` calls in flight per model under both engines; the Ray engine runs 2 worker
actors on a local cluster started before the timing (its start-up is reported apart). Runs alternate
between the engines (local, ray, ray, local, ...) so a change in the shared machine's load hits both.

What this measures on one 2-core box: the engines' overhead over endpoint-bound calls. Both engines send
the same requests to the same two single-threaded servers, which answer one request at a time, so the
servers set the pace; Ray's gain is in spreading calls to many endpoints from many nodes (rate limits,
network latency), which one machine cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _common import machine, md_table, write_results  # noqa: E402


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def write_inputs(directory: Path, n: int, backends: dict) -> tuple[Path, Path]:
    prompts = directory / "prompts.jsonl"
    with open(prompts, "w") as fh:
        for i in range(n):
            a, b = 3 + 7 * i % 50, 2 + 5 * i % 40
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"What is {a} + {b}? Reply with the number only.",
                                 "reference": str(a + b)}) + "\n")
    pool = directory / "pool.json"
    pool.write_text(json.dumps({
        "models": [
            {"name": "terse", "base_url": backends["small"], "model": "small", "cost_per_query": 0.001},
            {"name": "plain", "base_url": backends["large"], "model": "large", "cost_per_query": 0.002},
        ],
        "label": {"generation": {"terse": {"system": "Answer in one word.", "temperature": 0.0, "max_tokens": 8},
                                 "plain": {"temperature": 0.0, "max_tokens": 8}}},
    }))
    return prompts, pool


def one_run(engine: str, prompts: Path, pool_file: Path, out: Path, concurrency: int, workers: int) -> dict:
    from difficulty_router.data.labelling import Labeller, config_from_pool_file, openai_backend, read_prompt_rows
    from difficulty_router.scale.ray_label import RayLabeller

    pool, config = config_from_pool_file(pool_file, grader="number", concurrency=concurrency)
    backends = [openai_backend(m) for m in pool.models]
    labeller = Labeller(backends, config) if engine == "local" else RayLabeller(backends, config, workers=workers)
    rows = read_prompt_rows(prompts)
    start = time.perf_counter()
    report = labeller.run(rows, out, progress=False)
    seconds = time.perf_counter() - start
    assert report.calls == 2 * len(rows) and report.rows_written == len(rows), report
    return {"engine": engine, "calls": report.calls, "seconds": seconds, "calls_per_s": report.calls / seconds,
            "load": load_average()}


def worker_start(ray, pool_file: Path, workers: int) -> float:
    """Seconds to start the Ray engine's worker actors (a process each, importing the package and the OpenAI
    client): a cost every Ray run pays before its first call."""
    from difficulty_router.data.labelling import config_from_pool_file, openai_backend
    from difficulty_router.scale.ray_label import LabelWorker

    pool, config = config_from_pool_file(pool_file, grader="number")
    backends = [openai_backend(m) for m in pool.models]
    start = time.perf_counter()
    actors = [ray.remote(LabelWorker).options(num_cpus=1).remote(backends, config) for _ in range(workers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    seconds = time.perf_counter() - start
    for actor in actors:
        ray.kill(actor)
    return seconds


def measure(args) -> dict:
    from llama_servers import llama_server, smollm2_gguf

    from difficulty_router.scale.cluster import ensure_ray

    results: dict = {"machine": machine(), "args": vars(args), "load_before": load_average(), "runs": []}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        gguf = smollm2_gguf()
        backends = {alias: stack.enter_context(llama_server(gguf, alias)) for alias in ("small", "large")}
        prompts, pool_file = write_inputs(Path(tmp), args.prompts, backends)
        started = time.perf_counter()
        ray = ensure_ray(num_cpus=os.cpu_count())
        results["ray_start_s"] = time.perf_counter() - started
        results["worker_start_s"] = worker_start(ray, pool_file, args.workers)
        order = []
        for k in range(args.repeats):
            order += ["local", "ray"] if k % 2 == 0 else ["ray", "local"]
        for i, engine in enumerate(order):
            run = one_run(engine, prompts, pool_file, Path(tmp) / f"out{i}.jsonl", args.concurrency, args.workers)
            print(run, flush=True)
            results["runs"].append(run)
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine, alternating")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight per model (both engines)")
    parser.add_argument("--workers", type=int, default=2, help="Ray worker actors")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = measure(args)
    summary = []
    for engine in ("local", "ray"):
        rates = [r["calls_per_s"] for r in results["runs"] if r["engine"] == engine]
        summary.append({"engine": engine, "runs": len(rates), "min": min(rates), "max": max(rates),
                        "mean": sum(rates) / len(rates)})
    results["summary"] = summary
    names = {"local": "single process (threads)", "ray": f"Ray, {args.workers} worker actors"}
    md = [
        "# Labelling throughput: single process vs Ray",
        "",
        f"Machine: {machine()}; load average before: {results['load_before']} (a shared box: other jobs ran "
        "alongside; every figure moves with them).",
        f"Command: `python benchmarks/label_scale.py --prompts {args.prompts} --repeats {args.repeats}`; "
        f"{args.prompts} arithmetic prompts x 2 pool models = {2 * args.prompts} calls per run, two llama.cpp "
        "servers (SmolLM2-135M GGUF, 1 thread each, greedy, <= 8 tokens), number grader, "
        f"{args.concurrency} calls in flight per model, fresh output each run. Ray cluster start-up "
        f"(not in the figures): {results['ray_start_s']:.1f} s. Starting the {args.workers} worker actors, which "
        f"every Ray run does and its figures include: {results['worker_start_s']:.1f} s (measured apart).",
        "",
        md_table(
            ["engine", "runs", "calls/s (mean)", "calls/s (min-max over runs)"],
            [[names[s["engine"]], s["runs"], f"{s['mean']:.2f}", f"{s['min']:.2f}-{s['max']:.2f}"] for s in summary],
        ),
        "",
        md_table(
            ["run", "engine", "calls", "seconds", "calls/s", "load average"],
            [[i + 1, names[r["engine"]], r["calls"], f"{r['seconds']:.1f}", f"{r['calls_per_s']:.2f}", r["load"]]
             for i, r in enumerate(results["runs"])],
        ),
        "",
        "Reading: both engines send the same calls to the same two single-threaded servers, which answer one "
        "request at a time, so the servers set the pace here and the difference is each engine's overhead "
        "(Ray: its worker processes' start-up in each run, a task round trip per call, and Ray's own daemons "
        "on the same 2 cores). The Ray engine is for spreading "
        "calls to many endpoints from many nodes; one 2-core machine cannot show that gain.",
    ]
    write_results("label_scale", "\n".join(md) + "\n", results)


if __name__ == "__main__":
    main()
