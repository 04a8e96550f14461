"""Load test of `difficulty-router serve`: throughput, added latency, and what micro-batching buys.

    python benchmarks/server_load.py --clients 1 8 --duration 8   # the committed results' setting

Other settings (the defaults are --clients 1 4 16 --duration 10) write the same results/server_load.*.

Everything runs on loopback: a stub OpenAI-compatible backend that answers at once (so the
numbers are the routing layer's, not a model's), the routing server as a real
`difficulty-router serve` process (a router trained on 200 rows of the shipped RouteLLM
sample, SmolLM2-135M extractor, layer 0.5 / last token), and N concurrent clients sending
MMLU questions for a bounded time. The server runs twice: with micro-batching (up to 32
requests or 5 ms, `--max-batch 32`) and one by one (`--max-batch 1`). "added" latency is the client's p50/p99
through the router minus the same percentile straight to the stub at the same concurrency.
Clients, server and stub share the machine's cores, as a sidecar deployment would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, md_table, write_results

REPLY = {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "stub",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "B"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}}


async def stub_app(scope, receive, send):
    """A minimal ASGI OpenAI-compatible backend: every chat completion is answered "B" at once."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = json.dumps(REPLY if scope["path"].endswith("/chat/completions") else {"object": "list", "data": []}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout} s")


async def load(url: str, model: str, queries: list[str], clients: int, duration: float, cap: int) -> dict:
    """``clients`` workers send requests back to back for ``duration`` seconds (at most ``cap`` in all)."""
    import httpx

    latencies, routing, errors = [], [], 0
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        stop = time.monotonic() + duration

        async def worker(offset: int) -> None:
            nonlocal sent, errors
            i = offset
            while time.monotonic() < stop and sent < cap:
                sent += 1
                body = {"model": model, "messages": [{"role": "user", "content": queries[i % len(queries)]}],
                        "max_tokens": 1}
                start = time.perf_counter()
                response = await http.post("/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    errors += 1
                else:
                    latencies.append(elapsed * 1000)
                    if "x-router-latency-ms" in response.headers:
                        routing.append(float(response.headers["x-router-latency-ms"]))
                i += clients

        began = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.monotonic() - began
    lat = np.array(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": wall,
            "throughput": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "routing_p50_ms": float(np.percentile(routing, 50)) if routing else None}


def train_and_save(directory: Path, rows: int) -> None:
    from difficulty_router import ActivationExtractor, ModelPool, load_outcomes, train_router
    from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE
    from difficulty_router.extraction.feature_cache import FeatureCache
    from difficulty_router.extraction.model_store import cache_root

    outcomes = load_outcomes(ROUTELLM_MMLU_SAMPLE).subset(range(rows))
    extractor = ActivationExtractor("smollm2-135m", max_tokens=512, feature_cache=FeatureCache(cache_root() / "features"))
    router = train_router(outcomes, ModelPool.load(ROUTELLM_MMLU_POOL), extractor, layers=[0.5], pooling="last",
                          cv=3, progress=False)
    router.save(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (bounded)")
    parser.add_argument("--max-requests", type=int, default=5000, help="cap per run")
    parser.add_argument("--train-rows", type=int, default=200)
    parser.add_argument("--stub-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub_backend:
        import uvicorn

        uvicorn.run(stub_app, host="127.0.0.1", port=args.stub_backend, log_level="warning", access_log=False)
        return
    if max(args.clients) > 64 or args.duration > 60:
        raise SystemExit("keep it bounded: at most 64 clients and 60 s per run")

    from difficulty_router import load_outcomes
    from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE

    queries = [q if isinstance(q, str) else q[-1]["content"]
               for q in load_outcomes(ROUTELLM_MMLU_SAMPLE).subset(range(400, 800)).queries]
    work = Path(tempfile.mkdtemp(prefix="server-load-"))
    print("training the router ...", flush=True)
    train_and_save(work / "router", args.train_rows)
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, __file__, "--stub-backend", str(stub_port)])
    processes = [stub]
    results = {"direct": [], "batched": [], "one_by_one": []}
    try:
        stub_url = f"http://127.0.0.1:{stub_port}"
        wait_for(stub_url + "/v1/models", stub)
        pool = json.loads(Path(ROUTELLM_MMLU_POOL).read_text())
        for m in pool["models"]:
            m["base_url"] = stub_url + "/v1"
        (work / "pool.json").write_text(json.dumps(pool))
        first_model = pool["models"][0]["name"]
        for c in args.clients:
            r = asyncio.run(load(stub_url, first_model, queries, c, args.duration / 2, args.max_requests))
            results["direct"].append(r)
            print("direct", r, flush=True)
        cli = Path(sys.executable).with_name("difficulty-router")
        for mode, extra in (("batched", ["--max-batch", "32"]), ("one_by_one", ["--max-batch", "1"])):
            port = free_port()
            server = subprocess.Popen([str(cli), "serve", "--router", str(work / "router"), "--pool",
                                       str(work / "pool.json"), "--port", str(port), *extra])
            processes.append(server)
            url = f"http://127.0.0.1:{port}"
            wait_for(url + "/health", server)
            asyncio.run(load(url, "router", queries, 2, 2.0, 50))  # warm-up
            for c in args.clients:
                r = asyncio.run(load(url, "router", queries, c, args.duration, args.max_requests))
                results[mode].append(r)
                print(mode, r, flush=True)
            server.terminate()
            server.wait(timeout=30)
    finally:
        for p in processes:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)

    rows = []
    for i, c in enumerate(args.clients):
        direct = results["direct"][i]
        for mode in ("batched", "one_by_one"):
            r = results[mode][i]
            rows.append([c, mode.replace("_", "-"), r["requests"], r["errors"], f"{r['throughput']:.1f}",
                         f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                         f"{r['p50_ms'] - direct['p50_ms']:.1f}", f"{r['p99_ms'] - direct['p99_ms']:.1f}",
                         f"{r['routing_p50_ms']:.1f}" if r["routing_p50_ms"] is not None else "-"])
        rows.append([c, "direct to backend", direct["requests"], direct["errors"], f"{direct['throughput']:.1f}",
                     f"{direct['p50_ms']:.1f}", f"{direct['p99_ms']:.1f}", "-", "-", "-"])
    gains = [f"{c} clients: {results['batched'][i]['throughput'] / results['one_by_one'][i]['throughput']:.2f}x"
             for i, c in enumerate(args.clients)]
    md = (f"`difficulty-router serve` under load: stub backend answering at once, SmolLM2-135M extractor "
          f"(layer {'0.5'}, last token, prompts ~140 tokens), {args.duration:g} s per run, on {machine()}.\n\n"
          + md_table(["clients", "server", "requests", "errors", "req/s", "p50 ms", "p99 ms", "added p50 ms",
                      "added p99 ms", "routing p50 ms"], rows)
          + f"\n\nMicro-batching throughput gain over one-by-one: {', '.join(gains)}.\n")
    write_results("server_load", md, {"machine": machine(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
