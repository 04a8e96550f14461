"""Reliability under hostile input, load and faults: writes benchmarks/results/reliability.md.

Everything runs on loopback and stops by itself (each phase has a fixed budget):

- fuzz: hypothesis-generated bad inputs against the server's chat endpoint (raw bytes, truncated
  and deeply nested JSON, wrong types, malformed conversations and tool calls, lone surrogates,
  oversized bodies), the Python API (``route``), the loaders (tampered router and P(IK) bundles:
  pickle payloads in place of the arrays, swapped or dropped arrays with a recomputed hash, edited
  manifests) and the CLI (``route`` on tampered bundles and junk ``--messages``). Counted: 5xx
  answers, crashes (an exception other than the documented ValueError/FileNotFoundError, or a CLI
  exit other than 0/2), hangs (no answer within 20 s) and leaked stack traces or exception names.
- valid fuzz: hypothesis-generated *valid* but hostile chat bodies through the real server (every Unicode
  category, zero-width and right-to-left text, huge and deeply nested tool outputs, long conversations, mixed
  content parts, tool calls; ``tests/hostile_bodies.py``), so they reach the router and a backend: counted are
  the bodies routed and answered (the response's ``x-router-*`` headers, checked against the backends' call
  counts and the server's decision count), refused cleanly (4xx, OpenAI-shaped), 5xx, hangs, dropped
  connections, leaked traces and answers whose backend did not see the messages sent.
- load: 64 concurrent clients for a fixed time against two fast stub backends (stubs on purpose:
  this measures the server, not a model); sent / answered / failed, latency p50 / p99, and whether
  every answer echoes its own request's nonce (cross-talk).
- faults: the cheap backend (every request is routed to it first) is killed mid-run, hangs, returns
  500s, or cuts its stream mid-way; answered / sent and the time requests take to route around. The cut
  stream (two chunks, then the connection drops) runs three times: stream hold-back off (as before), on
  with the cut before commit (``StreamHoldback(chunks=4)``: it should escalate unseen, target 100%
  answered), and on with the cut right after commit (``chunks=2``: a well-formed error event, never a hang).
  These figures depend on the server's escalation loop, which is measured through the public HTTP
  behaviour only, so the benchmark keeps working when that loop is rewritten.
- Ray Serve (``--ray-serve``): the load and faults sections against 2 Ray Serve replicas instead of the
  in-process server, every client one conversation under the sticky session policy, the states in the shared
  store actor (or, with ``--redis``, in a redis-server); the answers' session headers must show each
  conversation's turns counted on, whichever replica served them.
- memory: the process's RSS before and after the load run (server, router and clients share the
  process).

    python benchmarks/reliability.py            # about 25 minutes on 2 busy cores (fuzzing alone took 1,174 s)
    python benchmarks/reliability.py --quick    # a smoke run
    python benchmarks/reliability.py --valid-fuzz-only   # 10,000 valid hostile bodies: reliability_valid_fuzz.md
    python benchmarks/reliability.py --load-only         # 64 clients, routed then direct: reliability_load.md
    python benchmarks/reliability.py --faults-only   # only the faults section (about 3 minutes): reliability_faults.md
    python benchmarks/reliability.py --ray-serve     # load and faults on 2 Ray Serve replicas, sticky sessions in the
                                                     # store actor (about 7 minutes): reliability_ray_serve.md
    python benchmarks/reliability.py --ray-serve --redis  # the same, sessions in a local redis-server (started here)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import io
import itertools
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import httpx
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the valid-body generator lives with its test
from _common import machine, md_table, write_results
from _stub_backend import StubBackend, serving
from hostile_bodies import hostile_body, send_all

from difficulty_router import (
    ActivationExtractor,
    DifficultyRouter,
    ModelPool,
    PIKProbe,
    Policy,
    StreamHoldback,
    load_outcomes,
    train_router,
)
from difficulty_router.cli.main import main as cli_main
from difficulty_router.datasets import ROUTELLM_MMLU_POOL, ROUTELLM_MMLU_SAMPLE
from difficulty_router.learning.probes import SuccessProbe
from difficulty_router.server import Backends, BackendSpec, create_app
from difficulty_router.server.schema import Limits

LEAK = re.compile(r'Traceback|File "|\.py", line|site-packages|\b(?:Type|Attribute|Key|Index|Recursion|Unicode\w*|'
                  r'Name|Runtime|Assertion|ZeroDivision)Error\b')
HANG_S = 20.0
LIMITS = Limits(max_body_bytes=1_000_000, max_chars=200_000)
ROUTE_TIMEOUT = 10.0  # seconds a request may wait for routing before the server answers 503


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


# -- inputs ---------------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                           max_size=4), max_leaves=20)
role = st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard", "", "USER"]) | json_leaf
content = (st.text(max_size=200) | json_leaf | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 5]), "text": json_leaf}) | json_leaf,
    max_size=3))
tool_calls = (json_leaf | st.lists(json_leaf | st.fixed_dictionaries(
    {"id": json_leaf, "type": st.just("function"),
     "function": json_leaf | st.fixed_dictionaries({"name": json_leaf, "arguments": json_leaf | json_value})}),
    max_size=3))
message = (st.fixed_dictionaries({"role": role, "content": content},
                                 optional={"tool_calls": tool_calls, "name": json_leaf, "tool_call_id": json_leaf})
           | json_leaf | st.text(max_size=20))
model = st.sampled_from(["router", "weak", "strong", "", "\ud800", "x" * 5000]) | json_leaf
chat_body = st.fixed_dictionaries(
    {"model": model, "messages": st.lists(message, max_size=5) | json_value},
    optional={"stream": json_leaf, "n": json_leaf, "max_tokens": json_leaf, "temperature": json_leaf,
              "tools": json_value, "stop": json_value, "max_completion_tokens": json_leaf})


def encode(value) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


raw_body = st.one_of(
    st.binary(max_size=300),
    chat_body.map(encode),
    chat_body.map(encode).flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda k: b[:k])),  # truncated
    st.integers(1, 60_000).map(lambda d: b'{"model": "router", "messages": ' + b"[" * d + b"]" * d + b"}"),
    st.integers(1, 3).map(lambda k: b'{"model": "router", "messages": [{"role": "user", "content": "'
                          + b"a" * (k * 700_000) + b'"}]}'),
    json_value.map(encode),
    st.sampled_from([b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
                     b'{"model": "router", "messages": [{"role": "user", "content": "\\udfff"}]}',
                     b'\xff\xfe{"model": 1}', b"null", b"[]", b"{}", b"   "]),
)


# -- fixtures -------------------------------------------------------------------------------

def build_router(max_tokens: int) -> DifficultyRouter:
    """A real router on the shipped sample (240 rows, layer 15, last token), as the tests train it."""
    from difficulty_router import FeatureCache, cache_root

    extractor = ActivationExtractor("smollm2-135m", layers=15, pooling="last", max_tokens=max_tokens,
                                    feature_cache=FeatureCache(cache_root() / "features"))
    train = load_outcomes(ROUTELLM_MMLU_SAMPLE).subset(range(240))
    return train_router(train, ModelPool.load(ROUTELLM_MMLU_POOL), extractor, layers=[15], pooling="last", cv=3,
                        families=("activation",), progress=False)


def read_out_dtype_note(router: DifficultyRouter) -> str:
    """The numeric path of the router's forward pass (``dtype="auto"`` picks bf16 where the CPU has it)."""
    return f"; the read-out runs in {str(router.extractor.dtype).removeprefix('torch.')}"


def stub_pool(router: DifficultyRouter) -> tuple[list[str], DifficultyRouter]:
    """The router with its pool renamed weak/strong is not needed: backends are named after its models."""
    return router.capability_order(), router


# -- fuzz -----------------------------------------------------------------------------------

class Tally:
    def __init__(self, name: str) -> None:
        self.name, self.n, self.server_errors, self.crashes, self.hangs, self.leaks = name, 0, 0, 0, 0, 0
        self.statuses: dict[str, int] = {}
        self.examples: list[str] = []

    def note(self, kind: str, example) -> None:
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {repr(example)[:200]}")

    def row(self) -> list:
        return [self.name, self.n, self.server_errors, self.crashes, self.hangs, self.leaks,
                ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))]


def fuzz_settings(n: int):
    return settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), derandomize=True)


def fuzz_server(url: str, n: int) -> Tally:
    tally = Tally("server: POST /v1/chat/completions")
    client = httpx.Client(timeout=HANG_S)

    @fuzz_settings(n)
    @given(raw_body)
    def one(body: bytes):
        tally.n += 1
        try:
            response = client.post(url + "/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"})
        except httpx.TimeoutException:
            tally.hangs += 1
            tally.note("hang", body)
            return
        except httpx.HTTPError as exc:
            tally.crashes += 1
            tally.note(f"transport {type(exc).__name__}", body)
            return
        key = f"{response.status_code // 100}xx" if response.status_code != 200 else "200"
        tally.statuses[key] = tally.statuses.get(key, 0) + 1
        if response.status_code >= 500:
            tally.server_errors += 1
            tally.note(f"{response.status_code} {response.text[:120]}", body)
        if LEAK.search(response.text):
            tally.leaks += 1
            tally.note("leak " + response.text[:200], body)

    one()
    client.close()
    return tally


def fuzz_python_api(router: DifficultyRouter, n: int) -> Tally:
    tally = Tally("Python API: router.route(query)")
    query = st.text(max_size=100) | json_value | st.lists(message, max_size=4) | st.binary(max_size=20)

    @fuzz_settings(n)
    @given(query)
    def one(q):
        tally.n += 1
        try:
            router.route(q)
            tally.statuses["decided"] = tally.statuses.get("decided", 0) + 1
        except ValueError as exc:
            tally.statuses["ValueError"] = tally.statuses.get("ValueError", 0) + 1
            if LEAK.search(str(exc)):
                tally.leaks += 1
                tally.note("leak", q)
        except Exception as exc:  # noqa: BLE001 - counting what escapes is the point
            tally.crashes += 1
            tally.note(type(exc).__name__, q)

    one()
    return tally


def _rehash(directory: Path, arrays: str, manifest: str) -> None:
    import hashlib

    meta = json.loads((directory / manifest).read_text())
    if isinstance(meta, dict):
        meta["arrays_sha256"] = hashlib.sha256((directory / arrays).read_bytes()).hexdigest()
        (directory / manifest).write_text(json.dumps(meta))


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tamper(directory: Path, data, arrays: str, manifest: str, marker: Path) -> None:
    """One edit of a saved bundle, chosen by ``data`` (a hypothesis draw function)."""
    from safetensors.numpy import load_file, save_file

    kind = data.draw(st.sampled_from(["manifest_value", "manifest_field", "pickle", "bytes", "truncate", "swap",
                                      "drop", "reshape"]))
    if kind == "manifest_value":
        (directory / manifest).write_text(json.dumps(data.draw(json_value)))
        return
    if kind == "manifest_field":
        meta = json.loads((directory / manifest).read_text())
        target = meta
        path = data.draw(st.lists(st.text(max_size=3) | st.sampled_from(list(meta)), min_size=1, max_size=3))
        for key in path[:-1]:
            if isinstance(target.get(key), dict):
                target = target[key]
        if data.draw(st.booleans()) and path[-1] in target:
            del target[path[-1]]
        else:
            target[path[-1] if path[-1] in target or data.draw(st.booleans()) else
                   data.draw(st.sampled_from(list(target) or ["x"]))] = data.draw(json_value)
        (directory / manifest).write_text(json.dumps(meta))
        return
    path = directory / arrays
    if kind == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=400)))
    elif kind == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    else:
        with open(path, "rb"):  # metadata travels with the arrays
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata()
        arrays_ = load_file(str(path))
        keys = sorted(arrays_)
        a, b = data.draw(st.sampled_from(keys)), data.draw(st.sampled_from(keys))
        if kind == "swap":
            arrays_[a], arrays_[b] = arrays_[b], arrays_[a]
        elif kind == "drop":
            del arrays_[a]
        else:
            arrays_[a] = np.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3)), dtype=np.float64)
        save_file(arrays_, str(path), metadata=metadata)
    if data.draw(st.booleans()):
        _rehash(directory, arrays, manifest)


def tampered_copy(clean: Path, target: Path, data, arrays: str, manifest: str, marker: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(clean, target)
    tamper(target, data, arrays, manifest, marker)
    return target


def fuzz_loaders(router: DifficultyRouter, pik: PIKProbe, n: int, work: Path) -> Tally:
    tally = Tally("loaders: DifficultyRouter.load / PIKProbe.load on tampered bundles")
    clean_router = router.save(work / "clean-router")
    clean_pik = pik.save(work / "clean-pik")
    marker = work / "pickle-ran"

    @fuzz_settings(n)
    @given(st.data())
    def one(data):
        tally.n += 1
        which = data.draw(st.sampled_from(["router", "pik"]))
        if which == "router":
            target = tampered_copy(clean_router, work / "tampered", data, "probes.safetensors", "manifest.json", marker)
            load = lambda: DifficultyRouter.load(target, router.extractor)
        else:
            target = tampered_copy(clean_pik, work / "tampered", data, "pik.safetensors", "pik.json", marker)
            load = lambda: PIKProbe.load(target)
        try:
            load()
            tally.statuses["loaded"] = tally.statuses.get("loaded", 0) + 1
        except (ValueError, FileNotFoundError) as exc:
            tally.statuses["refused"] = tally.statuses.get("refused", 0) + 1
            if LEAK.search(str(exc)):
                tally.leaks += 1
                tally.note("leak " + str(exc)[:150], which)
        except Exception as exc:  # noqa: BLE001
            tally.crashes += 1
            tally.note(f"{which} {type(exc).__name__}: {str(exc)[:100]}", which)
        if marker.exists():
            tally.crashes += 1
            tally.note("the pickle payload ran", which)
            marker.unlink()

    one()
    return tally


def fuzz_cli(router: DifficultyRouter, n: int, work: Path) -> Tally:
    """In-process ``difficulty-router route`` on tampered bundles and junk --messages: exit 0 or 2, no traceback."""
    tally = Tally("CLI: difficulty-router route")
    clean = router.save(work / "cli-router")
    marker = work / "cli-pickle-ran"

    @fuzz_settings(n)
    @given(st.data())
    def one(data):
        tally.n += 1
        target = tampered_copy(clean, work / "cli-tampered", data, "probes.safetensors", "manifest.json", marker)
        argv = ["route", "--router", str(target)]
        if data.draw(st.booleans()):
            argv += ["--messages", data.draw(json_value.map(json.dumps) | st.text(max_size=50))]
        else:
            argv += [data.draw(st.text(max_size=50))]
        err = io.StringIO()
        try:
            with redirect_stderr(err), redirect_stdout(io.StringIO()):
                code = cli_main(argv)
        except SystemExit as exc:  # argparse refusing the arguments
            code = exc.code
        except Exception as exc:  # noqa: BLE001
            tally.crashes += 1
            tally.note(type(exc).__name__, argv[3:])
            return
        tally.statuses[f"exit {code}"] = tally.statuses.get(f"exit {code}", 0) + 1
        if code not in (0, 2) or marker.exists():
            tally.crashes += 1
            tally.note(f"exit {code}" if code not in (0, 2) else "the pickle payload ran", argv[3:])
        if LEAK.search(err.getvalue()):
            tally.leaks += 1
            tally.note("leak " + err.getvalue()[:150], argv[3:])

    one()
    return tally


# -- load and faults ------------------------------------------------------------------------

class InBandError(Exception):
    """The server reported an error inside a stream it had started (after the backend broke), then ``[DONE]``."""


class UnendedInBandError(Exception):
    """An in-band error event that no ``data: [DONE]`` followed: not a well-formed end of the stream."""


async def drive(url: str, clients: int, seconds: float, stream: bool = False, timeout: float = 90.0,
                model: str = "router", session: str | None = None) -> dict:
    """``clients`` loops sending requests for ``seconds``; each checks its answer echoes its own nonce.

    ``lost``: requests that got no answer (transport error, client timeout), an answer of another status
    than 200/429/503, or another request's answer; 429/503 are the server's explicit shedding.

    ``session``: each client is one conversation (``X-Session-Id: <session>-client<k>``, its requests one after
    another), and what each answer's headers say of it is kept (turn, model, replica) for :func:`session_tally`."""
    latencies, failures, crosstalk, sent = [], {}, 0, 0
    seen: dict[int, list[tuple[int, str, str]]] = {k: [] for k in range(clients)}
    stop = time.monotonic() + seconds
    timeline: list[tuple[float, bool]] = []
    start = time.monotonic()

    async def client(k: int, http: httpx.AsyncClient):
        nonlocal crosstalk, sent
        i = 0
        while time.monotonic() < stop:
            nonce = f"client{k}-req{i}-{random.getrandbits(40):x}"
            i += 1
            sent += 1
            body = {"model": model, "messages": [{"role": "user", "content": f"Question {nonce}: what is {k} + {i}?"}],
                    "max_tokens": 8, "stream": stream}
            headers = {"X-Session-Id": f"{session}-client{k}"} if session else None
            t0 = time.monotonic()
            ok = False
            try:
                if stream:
                    text, done, errored = "", False, False
                    async with http.stream("POST", url + "/v1/chat/completions", json=body,
                                           headers=headers) as response:
                        if response.status_code == 200:
                            async for line in response.aiter_lines():
                                if line == "data: [DONE]":
                                    done = True
                                elif line.startswith("data: "):
                                    chunk = json.loads(line[6:])
                                    if "error" in chunk:
                                        errored = True  # read on: the stream must still end with [DONE]
                                        continue
                                    delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                                    text += delta.get("content") or ""
                        status = response.status_code
                    if errored:
                        raise InBandError() if done else UnendedInBandError()
                    ok = status == 200 and done and nonce in text
                    if status == 200 and done and nonce not in text:
                        crosstalk += 1
                    if not ok:
                        failures[f"stream {status}"] = failures.get(f"stream {status}", 0) + 1
                else:
                    response = await http.post(url + "/v1/chat/completions", json=body, headers=headers)
                    if response.status_code == 200:
                        reply = response.json()["choices"][0]["message"]["content"]
                        ok = nonce in reply
                        if not ok:
                            crosstalk += 1
                    else:
                        failures[str(response.status_code)] = failures.get(str(response.status_code), 0) + 1
            except Exception as exc:  # noqa: BLE001
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            if ok:
                latencies.append(time.monotonic() - t0)
                if session:
                    h = response.headers
                    seen[k].append((int(h.get("x-router-session-turn", 0)), h.get("x-router-model", ""),
                                    h.get("x-router-replica", "")))
            timeline.append((t0 - start, ok))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    answered = len(latencies)
    lat = np.array(latencies) if latencies else np.array([np.nan])
    shed = sum(v for k, v in failures.items() if k.split()[-1] in ("429", "503"))
    lost = sent - answered - shed - failures.get("InBandError", 0)
    return {"sent": sent, "answered": answered, "failed": sent - answered, "shed": shed, "lost": lost,
            "failures": failures,
            "crosstalk": crosstalk, "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p99_ms": float(np.percentile(lat, 99) * 1000), "max_ms": float(lat.max() * 1000),
            "seconds": time.monotonic() - start, "timeline": timeline,
            **({"sessions": seen} if session else {})}


def session_tally(seen: dict[int, list[tuple[int, str, str]]], order: list[str]) -> dict:
    """What the answers of each conversation say about the shared session store. A store per replica would
    restart a conversation's turn count on the replica that has not seen it (``turn resets``) and could move
    it to a cheaper model (``de-escalations``: sticky never does without ``allow_deescalation``)."""
    rank = {m: i for i, m in enumerate(order)}
    resets = deescalations = both = turns = 0
    for answers in seen.values():
        turns += len(answers)
        both += len({replica for _, _, replica in answers}) >= 2
        for (turn0, model0, _), (turn1, model1, _) in itertools.pairwise(answers):
            resets += turn1 <= turn0
            deescalations += rank.get(model1, -1) < rank.get(model0, -1)
    return {"sessions": len(seen), "answered_turns": turns, "sessions_on_both_replicas": both,
            "turn_resets": resets, "deescalations": deescalations}


def fuzz_valid(router, n: int, workers: int, max_tokens: int, progress: bool) -> dict:
    """``n`` valid hostile bodies through the real server in front of two echo stubs, ``workers`` at a time.

    The router reads the last ``max_tokens`` tokens (a copy of ``router``): the server is under test here, and
    a shorter read lets 10,000 bodies through in minutes on 2 cores; clipping to what routing reads is
    exercised all the more. Reaching routing is counted three ways: the answers' ``x-router-*`` headers
    (the client's view), the backends' calls, and the server's own count of decisions."""
    fast = copy.copy(router)
    fast.extractor = copy.copy(router.extractor)
    fast.extractor.max_tokens = max_tokens
    order = router.capability_order()
    stubs = {m: StubBackend(m).start() for m in order}
    app = create_app(fast, [BackendSpec(m, s.url, m, timeout=10) for m, s in stubs.items()], limits=LIMITS,
                     route_timeout=ROUTE_TIMEOUT)
    with serving(app) as url:
        tally = send_all(url, hostile_body(LIMITS, "router", tuple(order)), n, workers=workers, timeout=HANG_S,
                         progress=progress)
    for s in stubs.values():
        s.stop()
    return {"sent": tally.sent, "outcomes": tally.outcomes, "statuses": tally.statuses, "hangs": tally.hangs,
            "dropped": tally.dropped, "leaks": tally.leaks, "server_errors": tally.server_errors,
            "failed": tally.failed, "reached_routing": tally.reached_routing, "failures": tally.failures,
            "backend_calls": sum(s.calls for s in stubs.values()),
            "server_decisions": app.state.metrics.routing_latency.count, "seconds": tally.seconds,
            "workers": workers, "max_tokens": max_tokens}


def valid_fuzz_section(r: dict) -> str:
    o = r["outcomes"]
    table = md_table(
        ["bodies", "reached routing (routed, answered)", "backend named (answered)", "refused cleanly (4xx)", "5xx",
         "hangs", "dropped connections", "leaked traces", "mangled / unclean / unexpected", "backend calls",
         "server decisions", "seconds"],
        [[r["sent"], r["reached_routing"], o.get("direct", 0), o.get("refused", 0), r["server_errors"], r["hangs"],
          r["dropped"], r["leaks"], sum(o.get(k, 0) for k in ("mangled", "unclean", "unexpected")),
          r["backend_calls"], r["server_decisions"], f"{r['seconds']:.0f}"]])
    failures = "".join(f"- {f}\n" for f in r["failures"])
    return (
        f"## Valid but hostile bodies ({r['sent']} through the HTTP server, {r['workers']} at a time)\n\n{table}\n\n"
        "Bodies from `tests/hostile_bodies.py` (hypothesis, derandomized): every Unicode general category but lone "
        "surrogates, zero-width and bidi controls, noncharacters, combining-mark pile-ups, huge tool outputs and "
        "pasted documents (up to 80% of the character and byte limits), nested JSON text in tool outputs and tool "
        "arguments, nested values up to the depth limit (and one level past it), long conversations, mixed content "
        "parts (text, image_url, input_audio, file, refusal, unknown types), tool calls and tool/function messages, "
        "system/developer roles, empty-ish strings, odd but legal sampling fields and session ids; 2 in 10 name a "
        "backend instead of the router. Reached routing: a 200 whose `x-router-name` and `x-router-decision` say the "
        "router decided it, answered by a stub that returned the digest of exactly the messages sent (else it "
        "counts as mangled); backend calls and the server's decision count (its routing-latency histogram) are "
        "the cross-checks (decisions can exceed routed answers only by routed requests a backend then failed). "
        "Refused cleanly: a 4xx in OpenAI's error shape with a message and an `x-request-id`. Hang: no answer "
        f"within {HANG_S:g} s. Leaked trace: a traceback, source path or Python exception name anywhere the client "
        f"sees it but the echoed text. The router reads the last {r['max_tokens']} tokens in this section.\n\n"
        + ("First failures:\n" + failures + "\n" if failures else "")
    )


def load_section(load: dict, args) -> str:
    load_table = md_table(["requests", "clients", "seconds", "sent", "answered", "shed (429/503)", "lost",
                           "cross-talk", "failures", "answered/s", "p50 ms", "p99 ms"],
                          [[name, args.clients, f"{r['seconds']:.0f}", r["sent"], r["answered"], r["shed"], r["lost"],
                            r["crosstalk"], json.dumps(r["failures"]) if r["failures"] else "-",
                            f"{r['answered'] / r['seconds']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}"]
                           for name, r in load.items()])
    return (
        f"## Load ({args.clients} concurrent clients, {args.load_seconds:g} s each, non-streamed)\n\n{load_table}\n\n"
        f"Shed: explicit 429 (queue full) or 503 (not routed within {ROUTE_TIMEOUT:g} s) answers. Lost: no answer "
        "(transport error or a 90 s client timeout), another status, or another request's answer (target 0); an "
        "error event inside a started stream (InBandError) is an answer, not a loss. "
        "Cross-talk: answers that did not echo their own request's nonce (target 0). Routed requests each cost "
        "one SmolLM2 forward pass on the CPU (`--max-batch 1`), which bounds their rate; direct requests measure "
        "the server's own path. The server runs as `serve` runs it (`server.run.uvicorn_config`: keep-alive "
        "75 s, longer than the clients' 5 s idle expiry; an equal 5 s on both sides used to lose requests to "
        "`ReadError`, see `tests/test_server_keepalive.py`); the backends are uvicorn stubs with its default 5 s "
        "keep-alive, which the server's backend pool (2 s idle expiry) outlasts.\n\n"
    )


@contextlib.contextmanager
def plain_server(router, specs: list, holdback: StreamHoldback | None = None):
    """The routing server in this process, as ``serve`` runs it (uvicorn), with the benchmark's limits."""
    app = create_app(router, Backends(specs, cooldown=5.0), limits=LIMITS, max_batch=1, route_timeout=ROUTE_TIMEOUT,
                     stream_holdback=holdback)
    with serving(app) as url:
        yield url


#: the Ray Serve variant's session options: every conversation sticky, its state in the one store actor
RAY_SESSION_OPTIONS = {"session_policy": "sticky", "session_ttl": 600.0, "max_sessions": 10_000}


class RayServeServer:
    """The same server on ``replicas`` Ray Serve replicas (``scale.ray_serve.build_app``, ``--max-batch 1``)
    with sticky sessions shared by the replicas (in the store actor, or in Redis when ``session_store`` names
    it). Each call deploys the router (saved to a directory, as ``serve --engine ray`` does) over new backends,
    replacing the previous deployment; the proxy keeps its port. Serve's proxy keeps idle connections 90 s (its
    default), longer than the clients' 5 s."""

    def __init__(self, work: Path, replicas: int = 2, cpus_per_replica: float = 0.5, session_store=None) -> None:
        from difficulty_router.scale.cluster import ensure_ray

        ensure_ray()
        self.work, self.replicas, self.cpus = work, replicas, cpus_per_replica
        # None: the sessions live in the store actor; a RedisSessionStores: in that Redis (no actor)
        self.session_store = session_store
        self.url: str | None = None
        self.deployments = 0

    @contextlib.contextmanager
    def __call__(self, router, specs: list, holdback: StreamHoldback | None = None):
        from ray import serve

        from difficulty_router.scale.ray_serve import APP_NAME, build_app
        from difficulty_router.scale.ray_serve import run as run_serve

        self.deployments += 1
        directory = router.save(self.work / f"router-{self.deployments}")
        app = build_app({"router": directory}, specs, replicas=self.replicas, cpus_per_replica=self.cpus, max_batch=1,
                        app_options={"limits": LIMITS, "route_timeout": ROUTE_TIMEOUT, "stream_holdback": holdback,
                                     **RAY_SESSION_OPTIONS, "session_store": self.session_store})
        if self.url is None:
            from _stub_backend import free_port

            self.url = run_serve(app, port=free_port())
        else:
            serve.run(app, name=APP_NAME, route_prefix="/")
        yield self.url

    def close(self) -> None:
        from ray import serve

        from difficulty_router.scale.ray_metrics import drop_metrics_board, metrics_board_name
        from difficulty_router.scale.ray_serve import APP_NAME
        from difficulty_router.scale.ray_sessions import drop_session_store, session_store_name

        serve.shutdown()
        drop_session_store(session_store_name(APP_NAME, "router"))
        drop_metrics_board(metrics_board_name(APP_NAME))


def run_load(router, seconds: float, clients: int, server=plain_server, session: str | None = None
             ) -> tuple[dict, dict]:
    """Routed requests (each costs a forward pass), then requests naming a backend (the server's own path).
    ``server(router, specs)``: where the routing server runs (this process, or Ray Serve replicas)."""
    order = router.capability_order()
    stubs = {m: StubBackend(m).start() for m in order}
    results = {}
    with server(router, [BackendSpec(m, s.url, m, timeout=10) for m, s in stubs.items()]) as url:
        asyncio.run(drive(url, 8, 5.0))  # warm up
        before = rss_mb()
        results["routed (model: router)"] = asyncio.run(drive(url, clients, seconds, session=session and "routed"))
        # a request naming a backend is not routed, so it has no session turn: sent without one
        results["direct (model: a backend)"] = asyncio.run(drive(url, clients, seconds, model=order[0]))
        after = rss_mb()
    for s in stubs.values():
        s.stop()
    for r in results.values():
        r.pop("timeline")
        if "sessions" in r:
            r["sessions"] = session_tally(r["sessions"], order)
    sent = sum(r["sent"] for r in results.values())
    return results, {"before_mb": before, "after_mb": after, "growth_mb": after - before, "requests": sent}


#: the cut-stream runs: the stub sends two chunks, then drops the connection
CUT_STREAM_RUNS = {
    "cut stream, hold-back off": None,
    "cut stream before commit (hold-back 4 chunks)": StreamHoldback(chunks=4),
    "cut stream after commit (hold-back 2 chunks)": StreamHoldback(chunks=2),
}


def run_faults(router, seconds: float, clients: int, server=plain_server, session: str | None = None) -> dict:
    """Every fault, the cut stream under each hold-back of :data:`CUT_STREAM_RUNS`."""
    faults = {f: run_fault(router, f, seconds, clients, server=server, session=session)
              for f in ("killed", "hang", "500")}
    for name, holdback in CUT_STREAM_RUNS.items():
        faults[name] = run_fault(router, "cut stream", seconds, clients, holdback, server=server, session=session)
    return faults


def run_fault(router, fault: str, seconds: float, clients: int, holdback: StreamHoldback | None = None,
              server=plain_server, session: str | None = None) -> dict:
    """Every request is routed to the cheap backend first (threshold 0); it plays ``fault``; the server
    holds streams back per ``holdback`` (None: commit at the first chunk)."""
    order = router.capability_order()
    cheap, strong = order[0], order[-1]
    cheapest_first = copy.copy(router)
    cheapest_first.policy = Policy("threshold", 0.0)
    cheapest_first.ood = type(router.ood)(enabled=False)
    stubs = {cheap: StubBackend(cheap, {"killed": "ok", "hang": "hang", "500": "error", "cut stream": "cut"}[fault]),
             strong: StubBackend(strong)}
    for s in stubs.values():
        s.start()
    specs = [BackendSpec(m, s.url, m, timeout=2.0) for m, s in stubs.items()]
    label = session and f"{fault.replace(' ', '-')}-holdback{holdback.chunks if holdback else 0}"
    with server(cheapest_first, specs, holdback) as url:
        if fault == "killed":
            async def killed():
                task = asyncio.create_task(drive(url, clients, seconds, session=label))
                await asyncio.sleep(seconds / 3)
                kill_at = time.monotonic()
                await asyncio.to_thread(stubs[cheap].stop)
                result = await task
                result["kill_at_s"] = kill_at - (time.monotonic() - result["seconds"])
                return result
            result = asyncio.run(killed())
        else:
            result = asyncio.run(drive(url, clients, seconds, stream=fault == "cut stream", session=label))
    for s in stubs.values():
        s.stop()
    timeline = result.pop("timeline")
    if "sessions" in result:
        result["sessions"] = session_tally(result["sessions"], order)
    result["hold_back"] = holdback.describe() if holdback is not None else "off"
    if fault == "killed":  # how long after the kill until requests succeed again
        after = [(t, ok) for t, ok in timeline if t >= result["kill_at_s"]]
        failed_after = [t for t, ok in after if not ok]
        result["route_around_s"] = (max(failed_after) - result["kill_at_s"]) if failed_after else 0.0
    return result


# -- report ---------------------------------------------------------------------------------

def fault_section(faults: dict, args) -> str:
    """The faults table and what each row means, in markdown."""
    fault_rows = []
    for name, r in faults.items():
        around = f"{r['route_around_s']:.2f} s after the kill" if "route_around_s" in r else \
            f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms per answered request"
        fault_rows.append([name, r["sent"], r["answered"], f"{100 * r['answered'] / max(r['sent'], 1):.1f}%",
                           r["lost"], r["crosstalk"], json.dumps(r["failures"]) if r["failures"] else "-", around])
    fault_table = md_table(["cheap backend", "sent", "answered", "answered/sent", "lost", "cross-talk",
                            "failures", "time to route around"], fault_rows)
    return (
        f"## Faults ({args.fault_clients} clients, {args.fault_seconds:g} s each; the cheap backend gets every request "
        f"first, the strong one is healthy; backend timeout 2 s, cooldown 5 s)\n\n{fault_table}\n\n"
        "Killed: the cheap backend stops listening a third of the way in (connections refused from then on). "
        "Hang: it accepts and never answers. 500: it answers every call with HTTP 500. Cut stream: streamed "
        "requests; it sends two chunks and drops the connection. The server's stream hold-back "
        "(`serve --stream-holdback-chunks K`) decides what the client sees: off, the stream commits at its first "
        "chunk and the break reaches the client as an in-band error event (InBandError: a well-formed "
        "`data: {\"error\": ...}` event, then `data: [DONE]`; one without `[DONE]` would count as "
        "UnendedInBandError and as lost); held back 4 chunks, the cut comes before commit and "
        "the request escalates unseen to the strong backend; held back 2 chunks, the stream commits at the second "
        "chunk and the cut right after it is an in-band error again (continuing a partial answer on the next "
        "model is not built: the stub, like the llama.cpp servers, has no assistant-prefix continuation). "
        "These depend on the server's escalation loop.\n\n"
    )


def session_section(load: dict, faults: dict) -> str:
    """The conversations' view of the shared session store, for every run that had sessions."""
    # a run with no answered turn (the committed cut streams end in an error event) shows nothing of the store
    rows = [[name, t["sessions"], t["answered_turns"]] + ([t["sessions_on_both_replicas"], t["turn_resets"],
                                                          t["deescalations"]] if t["answered_turns"] else ["n/a"] * 3)
            for name, r in {**load, **faults}.items() if (t := r.get("sessions"))]
    table = md_table(["run", "conversations", "answered turns", "conversations served by both replicas",
                      "turn resets", "de-escalations"], rows)
    return (
        "## Sessions across replicas\n\n" + table + "\n\n"
        "Each client is one conversation (`X-Session-Id`), its requests one after another, under the sticky "
        "policy. Turn resets: an answer whose `x-router-session-turn` is not past the conversation's previous "
        "answer (a store per replica restarts the count on the replica that has not seen the conversation); "
        "de-escalations: a turn served by a less capable model than the turn before (sticky never does that). "
        "Target 0 for both.\n\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few examples, short phases")
    parser.add_argument("--server-examples", type=int, default=7000)
    parser.add_argument("--api-examples", type=int, default=1500)
    parser.add_argument("--loader-examples", type=int, default=1400)
    parser.add_argument("--cli-examples", type=int, default=100)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--fault-seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--fault-clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--faults-only", action="store_true",
                        help="run only the faults section; writes results/reliability_faults.md")
    parser.add_argument("--valid-examples", type=int, default=10_000, help="valid hostile bodies to send")
    parser.add_argument("--valid-workers", type=int, default=8, help="valid hostile bodies in flight at once")
    parser.add_argument("--valid-max-tokens", type=int, default=64,
                        help="tokens the router reads in the valid fuzz (the server is under test there)")
    parser.add_argument("--valid-fuzz-only", action="store_true",
                        help="run only the valid-body fuzz; writes results/reliability_valid_fuzz.md")
    parser.add_argument("--load-only", action="store_true",
                        help="run only the load section; writes results/reliability_load.md")
    parser.add_argument("--ray-serve", action="store_true",
                        help="the load and faults sections on Ray Serve replicas with sticky sessions in the shared "
                             "store; writes results/reliability_ray_serve.md")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (--ray-serve)")
    parser.add_argument("--redis", action="store_true",
                        help="with --ray-serve: the sessions in a redis-server started here (serve --session-store) "
                             "instead of the store actor; writes results/reliability_ray_serve_redis.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.quick:
        args.server_examples, args.api_examples, args.loader_examples, args.cli_examples = 200, 50, 50, 10
        args.load_seconds, args.fault_seconds, args.valid_examples = 5.0, 5.0, 200
    logging.basicConfig(level=logging.CRITICAL)  # the server logs every refused request and fault; counted here
    random.seed(0)
    started = time.monotonic()
    router = build_router(args.max_tokens)
    if args.faults_only:
        faults = run_faults(router, args.fault_seconds, args.fault_clients)
        markdown = ("# Reliability: faults only\n\n"
                    f"Machine: {machine()}. Router: SmolLM2-135M read-out trained on the shipped RouteLLM sample; "
                    "backends are fast stubs on loopback.\n\n" + fault_section(faults, args)
                    + "Command: `python benchmarks/reliability.py --faults-only"
                    + (" --quick`" if args.quick else "`") + f" ({time.monotonic() - started:.0f} s)\n")
        write_results("reliability_faults" if not args.quick else "reliability_faults_quick", markdown,
                      {"machine": machine(), "faults": faults, "args": vars(args)})
        return
    suffix = "_quick" if args.quick else ""
    command = "`" + " ".join(["python benchmarks/reliability.py", *sys.argv[1:]]) + "`"
    header = (f"Machine: {machine()}{read_out_dtype_note(router)}. Router: SmolLM2-135M read-out (layer 15, last "
              f"token, max {args.max_tokens} tokens) trained on 240 rows of the shipped RouteLLM sample; server limits "
              f"{LIMITS}. Backends are fast **stubs** (`benchmarks/_stub_backend.py`) on purpose: this measures the "
              "routing server, not a model. Everything on loopback.\n\n")
    if args.valid_fuzz_only:
        valid = fuzz_valid(router, args.valid_examples, args.valid_workers, args.valid_max_tokens,
                           not args.no_progress)
        markdown = ("# Reliability: valid but hostile bodies through the server\n\n" + header
                    + valid_fuzz_section(valid)
                    + f"Command: {command} ({time.monotonic() - started:.0f} s)\n")
        write_results("reliability_valid_fuzz" + suffix, markdown, {"machine": machine(), "valid_fuzz": valid,
                                                                     "args": vars(args)})
        return
    if args.ray_serve:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            stores = None
            if args.redis:
                from redis_server import redis_server

                from difficulty_router.routing.redis_sessions import RedisSessionStores

                redis = stack.enter_context(redis_server(Path(tmp)))
                stores = RedisSessionStores(redis.url, max_sessions=RAY_SESSION_OPTIONS["max_sessions"],
                                            ttl_s=RAY_SESSION_OPTIONS["session_ttl"])
            ray_server = RayServeServer(Path(tmp), replicas=args.replicas, session_store=stores)
            try:
                load, _ = run_load(router, args.load_seconds, args.clients, server=ray_server, session="load")
                faults = run_faults(router, args.fault_seconds, args.fault_clients, server=ray_server,
                                    session="faults")
            finally:
                ray_server.close()
        where = ("in one redis-server started by the benchmark on loopback (`--session-store redis://...`, "
                 "no store actor)" if args.redis else "in the one session store actor")
        markdown = (f"# Reliability on Ray Serve: {args.replicas} replicas, sticky sessions shared"
                    + (" in Redis" if args.redis else "") + "\n\n" + header
                    + f"The server is the deployment `serve --engine ray --replicas {args.replicas} --session-policy "
                    + ("sticky --session-store redis://...` " if args.redis else "sticky` ")
                    + "starts (`scale.ray_serve.build_app`, 0.5 CPU per replica, `--max-batch 1`), behind Serve's "
                    f"HTTP proxy; each conversation's state lives {where}. Load and faults "
                    "are the plain server's (`python benchmarks/reliability.py --load-only`, `--faults-only`), "
                    "every request in a conversation.\n\n"
                    + load_section(load, args) + fault_section(faults, args) + session_section(load, faults)
                    + f"Command: {command} ({time.monotonic() - started:.0f} s)\n")
        write_results("reliability_ray_serve" + ("_redis" if args.redis else "") + suffix, markdown,
                      {"machine": machine(), "load": load, "faults": faults, "args": vars(args)})
        return
    if args.load_only:
        load, memory = run_load(router, args.load_seconds, args.clients)
        markdown = ("# Reliability: load\n\n" + header + load_section(load, args)
                    + f"Command: {command} ({time.monotonic() - started:.0f} s)\n")
        write_results("reliability_load" + suffix, markdown, {"machine": machine(), "load": load, "memory": memory,
                                                               "args": vars(args)})
        return
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, router.extractor.hidden_size))
    pik = PIKProbe(SuccessProbe(cv=2).fit(X, (X[:, 0] > 0).astype(float), names=["self"]), layers=[15],
                   pooling="last", model_hash=router.extractor.model_hash)

    order = router.capability_order()
    stubs = {m: StubBackend(m).start() for m in order}
    app = create_app(router, [BackendSpec(m, s.url, m, timeout=10) for m, s in stubs.items()], limits=LIMITS)
    tallies = []
    with serving(app) as url:
        tallies.append(fuzz_server(url, args.server_examples))
    for s in stubs.values():
        s.stop()
    tallies.append(fuzz_python_api(router, args.api_examples))
    with tempfile.TemporaryDirectory() as tmp:
        tallies.append(fuzz_loaders(router, pik, args.loader_examples, Path(tmp)))
        tallies.append(fuzz_cli(router, args.cli_examples, Path(tmp)))
    fuzz_s = time.monotonic() - started
    valid = fuzz_valid(router, args.valid_examples, args.valid_workers, args.valid_max_tokens, not args.no_progress)

    load, memory = run_load(router, args.load_seconds, args.clients)
    faults = run_faults(router, args.fault_seconds, args.fault_clients)

    total = sum(t.n for t in tallies)
    fuzz_table = md_table(["target", "inputs", "5xx", "crashes", "hangs", "leaked traces", "outcomes"],
                          [t.row() for t in tallies] + [["**all**", total, sum(t.server_errors for t in tallies),
                                                          sum(t.crashes for t in tallies),
                                                          sum(t.hangs for t in tallies),
                                                          sum(t.leaks for t in tallies), ""]])
    examples = [f"- {t.name}: {e}" for t in tallies for e in t.examples]
    markdown = (
        "# Reliability: hostile input, load, faults, memory\n\n"
        f"Machine: {machine()}{read_out_dtype_note(router)}. Router: SmolLM2-135M read-out (layer 15, last token, "
        f"max {args.max_tokens} tokens) trained on 240 rows of the shipped RouteLLM sample; server limits "
        f"{LIMITS}. Backends are fast **stubs** (`benchmarks/_stub_backend.py`) on purpose: this measures the "
        f"routing server, not a model. Everything on loopback; fuzzing took {fuzz_s:.0f} s.\n\n"
        f"## Fuzz ({total} generated bad inputs, hypothesis)\n\n{fuzz_table}\n\n"
        "5xx: answers with status >= 500; crashes: an exception other than ValueError/FileNotFoundError from the "
        "Python API or loaders, a CLI exit other than 0/2, a dropped connection, or a pickle payload that ran; "
        f"hangs: no answer within {HANG_S:g} s; leaked traces: a traceback, a source path or a Python exception "
        "name in what the client sees.\n\n"
        + ("First failures:\n" + "\n".join(examples) + "\n\n" if examples else "")
        + valid_fuzz_section(valid)
        + load_section(load, args)
        + fault_section(faults, args)
        + f"## Memory\n\nRSS of the whole process (server, router, clients) {memory['before_mb']:.0f} MB before and "
        f"{memory['after_mb']:.0f} MB after the load run: {memory['growth_mb']:+.0f} MB "
        f"({memory['requests']} requests; bound: 50 MB).\n\n"
        f"Command: {command} ({time.monotonic() - started:.0f} s)\n")
    payload = {"machine": machine(), "fuzz": [{**vars(t)} for t in tallies], "valid_fuzz": valid, "load": load,
               "faults": faults,
               "memory": memory, "args": vars(args)}
    write_results("reliability" if not args.quick else "reliability_quick", markdown, payload)


if __name__ == "__main__":
    main()
