"""Scale-out on Ray: distributed extraction throughput with 1 and 2 workers, scaling efficiency, a projection
to 10 million prompts, and (``--serve``) Ray Serve vs the plain server's latency at the same load.

    python benchmarks/scale_out.py --rows 100 --serve   # the committed results' setting (default --rows 200)

Extraction runs on a fresh local Ray cluster with the feature cache off (every row is a forward pass), the
same prompts (the first ``--rows`` of the shipped RouteLLM MMLU sample) for every configuration; each worker
is one actor with one extractor and one torch thread. The single-process extractor with as many threads as
the machine has cores is the baseline. The machine's load average is recorded next to the figures: the
box these ran on is shared, and the numbers move with what else runs.

The latency part puts stub backends behind both servers (answers at once: what is measured is the server
and its routing read, not a model) and sends the same requests from ``--clients`` concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, write_results

TEN_MILLION = 10_000_000


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def prompts(rows: int):
    from difficulty_router.data.outcomes import load_outcomes
    from difficulty_router.datasets import ROUTELLM_MMLU_SAMPLE

    return load_outcomes(ROUTELLM_MMLU_SAMPLE).subset(np.arange(rows))


def single_process(queries, args) -> dict:
    from difficulty_router import ActivationExtractor

    start = time.perf_counter()
    ex = ActivationExtractor(
        "smollm2-135m", layers=args.layers, max_tokens=args.max_tokens, dtype="float32", threads=os.cpu_count()
    )
    loaded = time.perf_counter()
    ex.extract(queries, progress=False)
    done = time.perf_counter()
    return {
        "config": f"single process, {os.cpu_count()} threads",
        "workers": 0,
        "wall_s": done - start,
        "extract_s": done - loaded,
        "rows_per_s": len(queries) / (done - loaded),
        "load": load_average(),
    }


def distributed(path: Path, n: int, workers: int, args, out: Path) -> dict:
    from difficulty_router.scale.ray_extract import extract_distributed

    start = time.perf_counter()
    shards = extract_distributed(
        path,
        out / f"w{workers}",
        layers=args.layers,
        max_tokens=args.max_tokens,
        dtype="float32",
        workers=workers,
        rows_per_shard=args.rows_per_shard,
        feature_cache=None,
    )
    wall = time.perf_counter() - start
    assert shards.n_rows == n
    return {
        "config": f"Ray, {workers} worker{'s' * (workers > 1)} x 1 thread",
        "workers": workers,
        "wall_s": wall,
        "extract_s": shards.manifest["seconds"],
        "rows_per_s": n / shards.manifest["seconds"],
        "load": load_average(),
    }


@contextlib.contextmanager
def running(app):
    """The plain server under uvicorn on a loopback port, in a thread of this process."""
    import threading

    import uvicorn
    from _stub_backend import free_port

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


async def _latencies(url: str, questions: list[str], clients: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def worker(k: int) -> None:
            nonlocal errors
            for q in questions[k::clients]:
                body = {"model": "router", "messages": [{"role": "user", "content": q}], "max_tokens": 1}
                start = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=body)
                if r.status_code == 200:
                    latencies.append(1000 * (time.perf_counter() - start))
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - began
    lat = np.array(latencies)
    return {
        "requests": len(lat),
        "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "throughput": len(lat) / wall,
        "load": load_average(),
    }


def serve_vs_plain(args, queries) -> list[dict]:
    from _stub_backend import StubBackend, free_port

    from difficulty_router import ActivationExtractor, ModelPool, train_router
    from difficulty_router.data.queries import conversation_text
    from difficulty_router.datasets import ROUTELLM_MMLU_POOL
    from difficulty_router.extraction.feature_cache import FeatureCache
    from difficulty_router.extraction.model_store import cache_root
    from difficulty_router.scale.ray_serve import build_app, run, shutdown
    from difficulty_router.server import BackendSpec, create_app

    outcomes = prompts(args.rows)
    pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    ex = ActivationExtractor(
        "smollm2-135m", max_tokens=args.max_tokens, feature_cache=FeatureCache(cache_root() / "features")
    )
    router = train_router(
        outcomes, pool, ex, layers=[args.layers], pooling="last", cv=3, progress=False, families=("activation",)
    )
    weak, strong = StubBackend("weak").start(), StubBackend("strong").start()
    specs = [BackendSpec(pool.names[0], weak.url, "weak"), BackendSpec(pool.names[1], strong.url, "strong")]
    questions = [conversation_text(q)[-400:] for q in queries][: args.requests]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        router.save(tmp)
        with running(create_app(router, specs, max_batch=1)) as url:
            asyncio.run(_latencies(url, questions[:8], args.clients))  # warm-up
            rows.append({"server": "plain (uvicorn, 1 process, in-process batcher)", **asyncio.run(
                _latencies(url, questions, args.clients))})  # fmt: skip
        for replicas in (1, 2):
            url = run(
                build_app({"router": tmp}, specs, replicas=replicas, cpus_per_replica=1, max_batch=1),
                port=free_port(),
            )
            asyncio.run(_latencies(url, questions[:8], args.clients))
            rows.append(
                {
                    "server": f"Ray Serve, {replicas} replica{'s' * (replicas > 1)}, @serve.batch",
                    **asyncio.run(_latencies(url, questions, args.clients)),
                }
            )
            shutdown()
    return rows


def measure(args) -> dict:
    from difficulty_router.scale.cluster import ensure_ray

    outcomes = prompts(args.rows)
    queries = outcomes.queries
    results: dict = {"machine": machine(), "args": vars(args), "load_before": load_average(), "extraction": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"messages": q}) + "\n" for q in queries))
        results["extraction"].append(single_process(queries, args))
        ensure_ray(num_cpus=os.cpu_count())
        for workers in (1, 2):
            results["extraction"].append(distributed(path, len(queries), workers, args, Path(tmp)))
        if args.serve:
            results["serve"] = serve_vs_plain(args, queries)
        import ray

        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--layers", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=25)
    parser.add_argument("--serve", action="store_true", help="also measure Ray Serve vs the plain server")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--from-json", help="re-render benchmarks/results/scale_out.md from a saved .json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    if args.from_json:  # re-render the tables from a saved run
        results = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**results["args"], "from_json": args.from_json})
    else:
        results = measure(args)
    by = {r["workers"]: r for r in results["extraction"]}
    efficiency = by[2]["rows_per_s"] / (2 * by[1]["rows_per_s"])
    per_node = by[2]["rows_per_s"]  # one node = this machine with 2 workers
    results["scaling_efficiency_2_workers"] = efficiency
    projection = []
    for nodes in (1, 10, 100):
        linear = per_node * nodes
        pessimistic = per_node * (1 + (nodes - 1) * min(efficiency, 1.0))
        projection.append(
            {
                "nodes": nodes,
                "rows_per_s": linear,
                "hours": TEN_MILLION / linear / 3600,
                "rows_per_s_pessimistic": pessimistic,
                "hours_pessimistic": TEN_MILLION / pessimistic / 3600,
            }
        )
    results["projection_10M"] = projection

    md = [
        "# Scale-out on Ray: distributed extraction and Ray Serve",
        "",
        f"Machine: {machine()}; load average before: {results['load_before']} (a shared box: other jobs ran "
        "alongside, so every figure is a lower bound of what the machine does alone).",
        f"Command: `python benchmarks/scale_out.py --rows {args.rows}{' --serve' if args.serve else ''}`; "
        f"{args.rows} RouteLLM MMLU prompts (the shipped sample's first rows), SmolLM2-135M float32, read-out at "
        f"depth {args.layers}, prompts cut to their last {args.max_tokens} tokens, feature cache off, "
        f"{args.rows_per_shard} rows per shard.",
        "",
        "## Extraction throughput",
        "",
        md_table(
            ["configuration", "extract s", "rows/s", "wall s (incl. model load, cluster start)", "load average"],
            [
                [r["config"], f"{r['extract_s']:.1f}", f"{r['rows_per_s']:.2f}", f"{r['wall_s']:.1f}", r["load"]]
                for r in results["extraction"]
            ],
        ),
        "",
        f"Scaling efficiency from 1 to 2 workers: **{efficiency:.2f}** (rows/s with 2 workers / twice the rows/s "
        "with 1). Ray's 'extract s' counts from the read to the last shard, actor start-up (model load) included.",
        "",
        "## Projected time for 10 million prompts",
        "",
        md_table(
            ["nodes", "rows/s (linear)", "hours (linear)", "rows/s (pessimistic)", "hours (pessimistic)"],
            [
                [
                    p["nodes"],
                    f"{p['rows_per_s']:.1f}",
                    f"{p['hours']:.1f}",
                    f"{p['rows_per_s_pessimistic']:.1f}",
                    f"{p['hours_pessimistic']:.1f}",
                ]
                for p in projection
            ],
        ),
        "",
        "Assumptions: a node is this machine (2 cores, 2 workers) at the 2-worker throughput measured here, under "
        "the load shown; prompts have the length mix of the MMLU sample cut at the same token limit; no "
        "feature-cache hits; the input is split into many files or blocks and the driver's read and manifest "
        "are not the bottleneck. *Linear*: nodes add their throughput in full (workers share nothing but the "
        "input read and the manifest). *Pessimistic*: each node past the first adds only the measured 1->2 "
        "worker efficiency; on this box that efficiency mostly measures the other jobs holding the cores (with "
        "a load average near 11 on 2 cores, a second worker found no free core), not Ray. A GPU node runs "
        "batches of 16-32 and is not projected from these CPU figures.",
    ]
    if args.serve:
        md += [
            "",
            "## Ray Serve vs the plain server (same requests, same load)",
            "",
            f"{args.requests} chat completions of MMLU prompts (last 400 characters), {args.clients} concurrent "
            "clients, stub backends that answer at once; the plain server runs in the benchmark's own process "
            "(uvicorn in a thread), Serve behind its HTTP proxy.",
            "",
            md_table(
                ["server", "requests", "errors", "p50 ms", "p99 ms", "requests/s", "load average"],
                [
                    [
                        r["server"],
                        r["requests"],
                        r["errors"],
                        f"{r['p50_ms']:.0f}",
                        f"{r['p99_ms']:.0f}",
                        f"{r['throughput']:.1f}",
                        r["load"],
                    ]
                    for r in results["serve"]
                ],
            ),
        ]
    write_results("scale_out", "\n".join(md) + "\n", results)


if __name__ == "__main__":
    main()
