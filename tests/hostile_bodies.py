"""Valid but hostile chat-completions bodies, and the verdict on what the routing server answered to one.

Fuzzing with malformed bodies (``benchmarks/reliability.py``'s first section) stops at validation: none of
them reaches the router or a backend. These bodies pass the schema (most of them) and carry what real
clients and agents send that code rarely sees: every Unicode general category but lone surrogates, zero-width
and right-to-left controls, noncharacters and private-use code points, combining-mark pile-ups, scripts
without spaces, huge and deeply nested tool outputs (nested JSON *text*, and nested JSON values up to the
server's depth limit), long conversations, mixed content parts (text, image_url, input_audio, file, unknown
types), tool calls and tool/function messages, system and developer roles, empty-ish strings, and odd
but legal sampling fields. A few sit just past a limit (depth, characters, an empty conversation) so the
boundary is crossed too: those must be refused cleanly.

``hostile_body(limits, router, backends)`` is a hypothesis strategy of ``(body, encoded bytes, headers)``,
sized to fit ``limits``. ``judge(...)`` classifies one response: ``routed`` (decided by the router and
answered by a backend that saw exactly the messages sent), ``direct`` (a backend named, answered),
``refused`` (a 4xx in OpenAI's error shape with a message), or a failure (``5xx``, ``unclean``, ``mangled``,
``unexpected``), plus whether it leaked a trace. The backend must be ``benchmarks/_stub_backend.py``'s
echo stub, which returns the digest of the messages it received (``messages_digest``); benchmarks/ must be
on ``sys.path``.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from functools import cache

from _stub_backend import messages_digest
from hypothesis import strategies as st

#: a traceback, a source path or a Python exception name: what a client must never see
LEAK = re.compile(
    r'Traceback|File "|\.py", line|site-packages|\b(?:Type|Attribute|Key|Index|Recursion|Unicode\w*|'
    r"Name|Runtime|Assertion|ZeroDivision|Value|OS|Lookup|Overflow|Memory)Error\b"
)
#: every Unicode general category but Cs (lone surrogates are not valid Unicode: the server refuses them)
CATEGORIES = (
    "Lu",
    "Ll",
    "Lt",
    "Lm",
    "Lo",
    "Mn",
    "Mc",
    "Me",
    "Nd",
    "Nl",
    "No",
    "Pc",
    "Pd",
    "Ps",
    "Pe",
    "Pi",
    "Pf",
    "Po",
    "Sm",
    "Sc",
    "Sk",
    "So",
    "Zs",
    "Zl",
    "Zp",
    "Cc",
    "Cf",
    "Co",
    "Cn",
)
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u180e\u034f\u00ad"
BIDI = "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
ODD_POINTS = (
    "\x00\x01\x07\x1b\x7f\x85\xa0\u2028\u2029\ufffd\ufffe\uffff\ufdd0\U0001fffe\U0010ffff\U000e0001"
    "\U000f0000\U00100000\u3000\ud7ff\ue000\uf8ff\U0001d11e\U0001f3f3\ufe0f\U0001f9d1\u20e3"
)
COMBINING = "\u0300\u0301\u0336\u0489\u20dd\u0e49\u1ab0\u0f7a"
SCRIPTS = (
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם, מה שלומך?",
    "你好世界，今天天气怎么样？",
    "こんにちは世界。元気ですか？",
    "สวัสดีครับวันนี้อากาศดีมาก",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "𝕳𝖊𝖑𝖑𝖔 𝖂𝖔𝖗𝖑𝖉",
    "👨‍👩‍👧‍👦🏳️‍🌈🧑🏽‍💻",
    "Z̸̡̛̖̈́a̵̞͑l̴̰̓g̶̱̈́ő̷͉",
    "‮txet desrever‬ then ⁦isolated⁩ text",
    "a\u200bb\u200cc\u200dd\u2060e\ufefff",
)
EMPTYISH = ("", " ", "\n", "\t\r\n", "\u200b", "\u3000", "\ufeff", "\u202e", "\x00", "\u2028", "  \u200b  ")


# -- text ------------------------------------------------------------------------------------------------


@cache  # strategies are built once: building them on every draw cost most of the time
def _category_text(max_size: int):
    return st.sampled_from(CATEGORIES).flatmap(
        lambda c: st.text(st.characters(categories=[c]), min_size=1, max_size=max_size)
    )


@cache
def short_text(max_size: int = 60):
    """A short string of hostile text: any code point, one category, odd code points, scripts, empty-ish."""
    pieces = st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=max_size),
        _category_text(max_size),
        st.text(st.sampled_from(ZERO_WIDTH + BIDI + ODD_POINTS + COMBINING), min_size=1, max_size=max_size),
        st.sampled_from(SCRIPTS),
        st.sampled_from(EMPTYISH),
    )
    return st.one_of(pieces, st.lists(pieces, min_size=2, max_size=4).map("".join))


@cache
def huge_text(max_chars: int):
    """A long string (up to ``max_chars``) built by repeating a hostile unit: a log line, a script, RTL marks."""
    unit = st.one_of(short_text(30).filter(bool), st.sampled_from(["x", "lorem ipsum ", "\u202e\u05d0", "🧑🏽‍💻"]))
    return st.tuples(unit, st.integers(1, max(1, max_chars))).map(lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]])


@cache
def nested_json_text(max_chars: int):
    """A tool output that is deeply nested JSON *text* (a string to the server, so no depth limit applies)."""
    most = max(1, (max_chars - 20) // 12)
    return st.tuples(st.integers(1, most), st.sampled_from(["list", "object", "mixed"]), short_text(20)).map(
        lambda t: {
            "list": "[" * t[0] + json.dumps(t[2]) + "]" * t[0],
            "object": '{"a":' * t[0] + json.dumps(t[2]) + "}" * t[0],
            "mixed": '{"k":[' * t[0] + json.dumps(t[2]) + "]}" * t[0],
        }[t[1]]
    )


@cache
def nested_value(levels: int):
    """A JSON value exactly ``levels`` containers deep (dicts with hostile keys, lists), ending in a leaf."""
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), short_text(20)
    )

    def wrap(inner, key):
        return {key: inner} if len(key) % 2 == 0 else [inner]

    return st.tuples(leaf, st.lists(short_text(8), min_size=levels, max_size=levels)).map(
        lambda t: _fold(t[0], t[1], wrap)
    )


def _fold(leaf, keys, wrap):
    value = leaf
    for key in keys:
        value = wrap(value, key)
    return value


# -- messages --------------------------------------------------------------------------------------------


@cache
def _data_url(kind: str):
    return st.binary(min_size=0, max_size=300).map(lambda b: f"data:{kind};base64," + base64.b64encode(b).decode())


@cache
def content_parts(text):
    part = st.one_of(
        text.map(lambda t: {"type": "text", "text": t}),
        st.fixed_dictionaries(
            {
                "type": st.just("image_url"),
                "image_url": st.fixed_dictionaries(
                    {"url": _data_url("image/png") | short_text(40).map(lambda t: "https://example.invalid/" + t)},
                    optional={"detail": st.sampled_from(["low", "high", "auto"])},
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("input_audio"),
                "input_audio": st.fixed_dictionaries({"data": _data_url("audio/wav"), "format": st.just("wav")}),
            }
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("file"),
                "file": st.fixed_dictionaries({"filename": short_text(20), "file_data": _data_url("text/plain")}),
            }
        ),
        st.fixed_dictionaries({"type": st.just("refusal"), "refusal": short_text(40)}),
        st.fixed_dictionaries(
            {"type": short_text(12).filter(lambda t: t != "text")}, optional={"payload": nested_value(3)}
        ),
    )
    return st.lists(part, min_size=1, max_size=5)


@cache
def _content(text):
    return st.one_of(text, text, content_parts(text))


@cache
def _tool_call(text):
    arguments = st.one_of(
        nested_value(4).map(json.dumps), short_text(40), nested_json_text(400), st.just("{}"), st.just("")
    )
    return st.fixed_dictionaries(
        {
            "id": short_text(16),
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": short_text(24), "arguments": arguments}),
        }
    )


@st.composite
def conversation(draw, max_messages: int, big: int):
    """A conversation of at most ``max_messages``: an optional system/developer preamble, turns of users,
    assistants (some only calling tools), tool answers, legacy function messages; one field may be huge."""
    text = short_text(80)
    huge = st.one_of(huge_text(big), nested_json_text(big))
    messages: list[dict] = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(_content(text))})
    if draw(st.integers(0, 4)) == 0 and max_messages > 8:  # a long conversation, from a few drawn texts
        count = draw(st.integers(max(1, max_messages // 3), max_messages - len(messages)))
        pool = draw(st.lists(text, min_size=1, max_size=6))
        roles = draw(
            st.lists(st.sampled_from(["user", "assistant", "user", "developer", "system"]), min_size=1, max_size=4)
        )
        messages += [{"role": roles[i % len(roles)], "content": pool[i % len(pool)]} for i in range(count)]
        return [*messages, {"role": "user", "content": draw(text)}] if len(messages) < max_messages else messages
    for _ in range(draw(st.integers(1, 4))):
        user = {"role": "user", "content": draw(_content(text))}
        if draw(st.integers(0, 9)) == 0:
            user["name"] = draw(short_text(16))
        messages.append(user)
        kind = draw(st.sampled_from(["none", "answer", "tools", "function"]))
        if kind == "answer":
            messages.append({"role": "assistant", "content": draw(_content(text))})
        elif kind == "tools":
            calls = draw(st.lists(_tool_call(text), min_size=1, max_size=3))
            messages.append(
                {"role": "assistant", "content": draw(st.sampled_from([None, ""]) | text), "tool_calls": calls}
            )
            for call in calls:
                output = draw(st.one_of(text, huge, content_parts(text)))
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": output})
        elif kind == "function":
            messages.append({"role": "function", "name": draw(short_text(16)), "content": draw(text)})
    if draw(st.booleans()):  # one huge field: a pasted document or a tool's dump
        where = draw(st.integers(0, len(messages) - 1))
        if isinstance(messages[where].get("content"), str):
            messages[where]["content"] = draw(huge)
    if messages[-1]["role"] != "user" and draw(st.booleans()):
        messages.append({"role": "user", "content": draw(text)})
    return messages[:max_messages]


# -- bodies ----------------------------------------------------------------------------------------------


@cache
def _fields(limits):
    floats = st.floats
    return {
        "temperature": floats(0, 2),
        "top_p": floats(0, 1),
        "max_tokens": st.integers(1, limits.max_tokens),
        "max_completion_tokens": st.integers(1, limits.max_tokens),
        "n": st.integers(1, limits.max_n),
        "stop": short_text(8) | st.lists(short_text(8), max_size=4),
        "stream": st.booleans(),
        "user": short_text(60).filter(lambda t: t.strip() != "" and len(t) <= 512),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "presence_penalty": floats(-2, 2),
        "frequency_penalty": floats(-2, 2),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20),
        "logit_bias": st.dictionaries(st.integers(0, 50_000).map(str), st.integers(-100, 100), max_size=4),
        "tool_choice": st.sampled_from(["auto", "none", "required"])
        | short_text(16).map(lambda n: {"type": "function", "function": {"name": n}}),
        "parallel_tool_calls": st.booleans(),
        "metadata": st.dictionaries(short_text(16), short_text(40), max_size=4),
    }


@st.composite
def _tools(draw, depth_room: int):
    """``tools`` whose parameter schemas nest up to the room the depth limit leaves (body > tools > tool >
    function > parameters is 5 levels already)."""
    tools = []
    for _ in range(draw(st.integers(1, 3))):
        schema = {"type": "object", "properties": draw(nested_value(draw(st.integers(0, max(0, depth_room)))))}
        tools.append(
            {
                "type": "function",
                "function": {"name": draw(short_text(24)), "description": draw(short_text(80)), "parameters": schema},
            }
        )
    return tools


@st.composite
def hostile_body(draw, limits, router: str = "router", backends: tuple[str, ...] = ()):
    """``(body, encoded, headers)``: a chat-completions body for ``router`` (mostly) or a backend by name, sized
    to ``limits`` (a :class:`difficulty_router.server.schema.Limits`), encoded as UTF-8 JSON or ASCII escapes."""
    ascii_escapes = draw(st.integers(0, 3)) == 0
    per_char = 12 if ascii_escapes else 4  # an astral code point escaped: \\ud83e\\udd1d
    big = max(100, min(int(0.8 * limits.max_chars), int(0.8 * limits.max_body_bytes) // per_char))
    messages = draw(conversation(min(limits.max_messages, 300), big))
    model = draw(st.sampled_from([router] * 8 + list(backends)))
    body: dict = {"model": model, "messages": messages}
    fields = _fields(limits)
    for key in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=6)):
        body[key] = draw(fields[key])
    if draw(st.integers(0, 3)) == 0:
        body["tools"] = draw(_tools(limits.max_depth - 5))
    if draw(st.integers(0, 4)) == 0:  # a nested extra field at the depth limit, or one level past it
        levels = st.integers(1, limits.max_depth) | st.sampled_from([limits.max_depth - 1, limits.max_depth])
        body[draw(short_text(12).filter(lambda k: k not in body))] = draw(nested_value(draw(levels)))
    headers = {"content-type": "application/json"}
    if draw(st.integers(0, 5)) == 0:
        headers["x-session-id"] = draw(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
        )
    encoded = json.dumps(body, ensure_ascii=ascii_escapes).encode()
    return body, encoded, headers


# -- verdicts --------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What one response was: ``outcome`` is routed, direct, refused, or a failure; ``leak`` on its own."""

    outcome: str
    leak: bool = False
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.leak or self.outcome not in ("routed", "direct", "refused")


def judge(status: int, headers, text: str, body: dict, router: str) -> Verdict:
    """The verdict on one response to ``body`` (headers: a case-insensitive mapping)."""
    streaming = body.get("stream") is True
    if status >= 500:
        return Verdict("5xx", bool(LEAK.search(text)), f"{status} {text[:200]}")
    if 400 <= status < 500:
        leak = bool(LEAK.search(text))
        try:
            error = json.loads(text)["error"]
            clean = (
                set(error) == {"message", "type", "param", "code"}
                and isinstance(error["message"], str)
                and error["message"].strip() != ""
                and "x-request-id" in headers
            )
        except (ValueError, KeyError, TypeError):
            clean = False
        return Verdict("refused" if clean else "unclean", leak, f"{status} {text[:200]}")
    if status != 200:
        return Verdict("unexpected", bool(LEAK.search(text)), f"{status} {text[:200]}")
    routed = headers.get("x-router-name") == router and headers.get("x-router-decision") not in (None, "direct")
    outcome = "routed" if routed else "direct" if headers.get("x-router-decision") == "direct" else "unexpected"
    if streaming:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
        leak = any(LEAK.search(e) for e in errors)
        if not events or events[-1] != "[DONE]" or errors:
            return Verdict("mangled", leak, f"stream ended {events[-1:]} with {len(errors)} error events")
        return Verdict(outcome, leak)
    data = json.loads(text)
    answer_free = {k: v for k, v in data.items() if k != "choices"}  # the echo repeats the client's own text
    leak = bool(LEAK.search(json.dumps(answer_free)) or LEAK.search(json.dumps(dict(headers))))
    seen = (data.get("stub_seen") or {}).get("messages_sha256")
    if seen != messages_digest(body["messages"]):
        return Verdict("mangled", leak, "the backend did not receive the messages the client sent")
    return Verdict(outcome, leak)


# -- sending ---------------------------------------------------------------------------------------------


@dataclass
class FuzzTally:
    """Counts of one fuzz run: outcomes (routed, direct, refused, ...), hangs, dropped connections, leaks."""

    sent: int = 0
    hangs: int = 0
    dropped: int = 0
    leaks: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.failures: list[str] = []
        self.statuses: dict[str, int] = {}

    def add(self, verdict: Verdict, status: int | None, body_bytes: bytes) -> None:
        self.sent += 1
        self.outcomes[verdict.outcome] = self.outcomes.get(verdict.outcome, 0) + 1
        if status is not None:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        self.leaks += verdict.leak
        self.hangs += verdict.outcome == "hang"
        self.dropped += verdict.outcome == "dropped"
        if verdict.failed and len(self.failures) < 10:
            self.failures.append(
                f"{verdict.outcome}{' (leak)' if verdict.leak else ''}: {verdict.detail[:200]} <- {body_bytes[:300]!r}"
            )

    @property
    def reached_routing(self) -> int:
        return self.outcomes.get("routed", 0)

    @property
    def server_errors(self) -> int:
        return self.outcomes.get("5xx", 0)

    @property
    def failed(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k not in ("routed", "direct", "refused")) + self.leaks


def send_all(
    url: str,
    bodies,
    n: int,
    *,
    router: str = "router",
    workers: int = 4,
    timeout: float = 20.0,
    progress: bool = False,
) -> FuzzTally:
    """Send ``n`` bodies drawn from ``bodies`` (a strategy of ``hostile_body``'s tuples) to ``url``'s chat
    endpoint from ``workers`` threads at once, and judge each answer. Hypothesis draws in this thread (it is
    not thread-safe) while the workers send; no answer within ``timeout`` seconds is a hang."""
    import queue
    import threading
    import time

    import httpx
    from hypothesis import HealthCheck, Phase, given, settings

    tally, lock = FuzzTally(), threading.Lock()
    pending: queue.Queue = queue.Queue(maxsize=2 * workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="valid hostile bodies", unit="body")

    def worker() -> None:
        with httpx.Client(timeout=timeout) as client:
            while (item := pending.get()) is not None:
                body, encoded, headers = item
                status = None
                try:
                    response = client.post(url + "/v1/chat/completions", content=encoded, headers=headers)
                    status = response.status_code
                    verdict = judge(status, response.headers, response.text, body, router)
                except httpx.TimeoutException:
                    verdict = Verdict("hang", detail=f"no answer within {timeout:g} s")
                except httpx.HTTPError as exc:
                    verdict = Verdict("dropped", detail=f"{type(exc).__name__}: {exc}")
                with lock:
                    tally.add(verdict, status, encoded)
                if bar is not None:
                    bar.update()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    how = settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )

    @how
    @given(bodies)
    def draw(item) -> None:
        pending.put(item)

    try:
        draw()
    finally:
        for _ in threads:
            pending.put(None)
        for thread in threads:
            thread.join()
        if bar is not None:
            bar.close()
    tally.seconds = time.monotonic() - start
    return tally
