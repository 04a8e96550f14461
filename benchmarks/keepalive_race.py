"""Why requests were lost under load, on purpose: reuse keep-alive connections just as the other side closes them.

``benchmarks/reliability.py`` once lost 2 of 2,462 direct requests under 64 clients with httpx ``ReadError``. The
cause: uvicorn closes a connection idle for 5 s (its default keep-alive) and httpx (like the ``openai`` package)
reuses one idle for up to 5 s. A client that reused a connection as the server's timer fired had its request
read by nobody and the connection reset. Under load this is rare, but every idle connection of the pool is a
chance; here the timing is forced: ``--pairs`` connections each send one request, wait just under 5 s
(4.85..5.0 s, spread), and send another on the same connection, all at once, against the real routing app
(uvicorn on loopback, the real router, echo-stub backends served by uvicorn with its default 5 s keep-alive).

Two hops, each with the old and the new setting: the client to the routing server (server keep-alive 5 s, as
uvicorn's default, vs ``server.run.KEEP_ALIVE_S``), and the server's pool to the backends (idle expiry 5 s, as
httpx's default, vs ``server.backends.BACKEND_KEEPALIVE_S``); a lost backend connection surfaces as a 502
(requests name a backend, so there is nothing to escalate to). Lost: a transport error or a 5xx.

    python benchmarks/keepalive_race.py    # about 2 minutes; writes results/keepalive_race.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, write_results
from _stub_backend import StubBackend, free_port
from reliability import LIMITS, build_router

import difficulty_router.server.backends as backends_module
from difficulty_router.server import BackendSpec, create_app
from difficulty_router.server.run import KEEP_ALIVE_S, uvicorn_config

OLD_SERVER_KEEP_ALIVE_S = 5  # uvicorn's default
OLD_POOL_EXPIRY_S = 5.0  # httpx's default


async def pair(url: str, body: dict, gap: float) -> str:
    """Two requests on one connection, ``gap`` seconds apart; the second's outcome."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=1)) as http:
        first = await http.post(url + "/v1/chat/completions", json=body)
        if first.status_code != 200:
            return f"first {first.status_code}"
        await asyncio.sleep(gap)
        try:
            return str((await http.post(url + "/v1/chat/completions", json=body)).status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__


def trial(router, stubs, server_keep_alive: float, pool_expiry: float, pairs: int, rounds: int) -> Counter:
    backends_module.BACKEND_KEEPALIVE_S = pool_expiry  # read when the app's backend pool starts
    model = router.capability_order()[0]
    app = create_app(router, [BackendSpec(m, s.url, m, timeout=10) for m, s in stubs.items()], limits=LIMITS)
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(app, "127.0.0.1", port, log_level="critical", timeout_keep_alive=server_keep_alive)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    outcomes: Counter = Counter()
    for _ in range(rounds):

        async def all_pairs():
            return await asyncio.gather(
                *(pair(f"http://127.0.0.1:{port}", body, 5.0 - 0.15 * i / pairs) for i in range(pairs))
            )

        outcomes.update(asyncio.run(all_pairs()))
    server.should_exit = True
    thread.join(timeout=15)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=150, help="connections reused at once")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    started = time.monotonic()
    router = build_router(256)
    stubs = {m: StubBackend(m).start() for m in router.capability_order()}
    settings = [
        ("server keep-alive, old", OLD_SERVER_KEEP_ALIVE_S, backends_module.BACKEND_KEEPALIVE_S),
        ("server keep-alive, new", KEEP_ALIVE_S, backends_module.BACKEND_KEEPALIVE_S),
        ("backend pool expiry, old", KEEP_ALIVE_S, OLD_POOL_EXPIRY_S),
        ("backend pool expiry, new", KEEP_ALIVE_S, backends_module.BACKEND_KEEPALIVE_S),
    ]
    rows, payload = [], {}
    for name, keep_alive, expiry in settings:
        outcomes = trial(router, stubs, keep_alive, expiry, args.pairs, args.rounds)
        sent = sum(outcomes.values())
        lost = sum(n for k, n in outcomes.items() if k != "200")
        rows.append(
            [
                name,
                f"{keep_alive:g} s",
                f"{expiry:g} s",
                sent,
                lost,
                ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items())),
            ]
        )
        payload[name] = {"server_keep_alive_s": keep_alive, "pool_expiry_s": expiry, "outcomes": dict(outcomes)}
        print(rows[-1], flush=True)
    for s in stubs.values():
        s.stop()
    table = md_table(
        [
            "setting",
            "routing server keep-alive",
            "server's backend pool idle expiry",
            "reused connections",
            "lost",
            "second requests' outcomes",
        ],
        rows,
    )
    markdown = (
        "# Keep-alive race: the lost requests of the 64-client load, forced\n\n"
        f"Machine: {machine()}. The real routing app under uvicorn on loopback, echo-stub backends (uvicorn, default "
        f"5 s keep-alive). {args.pairs} connections at once, {args.rounds} rounds: each sends a request naming a "
        "backend, waits 4.85..5.0 s (spread over the connections), and sends another on the same connection. The "
        "client is httpx with its default 5 s idle expiry (as the `openai` package).\n\n"
        f"{table}\n\n"
        "Lost: a transport error (the connection reset under the request: httpx `ReadError`, the symptom seen under "
        "load) or a 5xx (a backend connection reset under the server's forwarded request: 502, nothing to escalate "
        "to for a named backend). Old: uvicorn's and httpx's defaults, equal on both sides of each hop. New: the "
        f"server keeps idle connections {KEEP_ALIVE_S} s (`server.run.KEEP_ALIVE_S`), its backend pool drops them "
        f"after {backends_module.BACKEND_KEEPALIVE_S:g} s (`server.backends.BACKEND_KEEPALIVE_S`): the side that "
        "sends gives up first.\n\n"
        f"Command: `python benchmarks/keepalive_race.py` ({time.monotonic() - started:.0f} s)\n"
    )
    write_results("keepalive_race", markdown, {"machine": machine(), "args": vars(args), "settings": payload})


if __name__ == "__main__":
    main()
