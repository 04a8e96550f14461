"""A fast OpenAI-compatible stub backend for measuring the routing server itself.

Stub, not a model, on purpose: the reliability benchmark measures what the *server* does
under load and faults (queueing, shedding, escalation, cross-talk), and a real model's
seconds per answer would hide that. The reply echoes the last user message, so a client can
check that the answer it got belongs to its own request (the echo stops after ``ECHO_CHARS``, so a huge
prompt does not become a stream of thousands of chunks). A non-streamed answer also carries
``stub_seen.messages_sha256``, the digest of the messages the stub received (:func:`messages_digest`):
a client compares it with its own to know the server forwarded the conversation untouched. ``mode``
switches the fault it plays: ``ok``, ``hang`` (never answers), ``error`` (HTTP 500), ``cut`` (a stream
closed mid-way).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from difficulty_router.server.run import uvicorn_config

ECHO_CHARS = 4000


def messages_digest(messages) -> str:
    """A digest of a conversation that does not depend on key order or on how the JSON was escaped."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StubBackend:
    def __init__(self, name: str, mode: str = "ok") -> None:
        self.name, self.mode, self.calls = name, mode, 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.app = self._build()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            self.calls += 1
            body = await request.json()
            text = f"{self.name} echo: {body['messages'][-1].get('content')}"[:ECHO_CHARS]
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if self.mode == "error":
                return JSONResponse({"error": {"message": "stub failure", "type": "server_error"}}, status_code=500)
            created = int(time.time())
            if body.get("stream"):
                return StreamingResponse(
                    self._stream(text, created, cut=self.mode == "cut"), media_type="text/event-stream"
                )
            return {
                "id": "stub",
                "object": "chat.completion",
                "created": created,
                "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "stub_seen": {"messages_sha256": messages_digest(body["messages"])},
            }

        return app

    async def _stream(self, text: str, created: int, cut: bool):
        words = text.split(" ")
        for i, word in enumerate(words):
            if cut and i == 2:
                raise RuntimeError("stub closes the stream mid-way")  # uvicorn drops the connection
            chunk = {
                "id": "stub",
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.name,
                "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        end = {
            "id": "stub",
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.name,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"

    def start(self) -> StubBackend:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="critical", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name=f"stub-{self.name}")
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving: from now on connections to the port are refused (a killed backend)."""
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            self._thread.join(timeout=10)
            self._server = None


@contextlib.contextmanager
def serving(app, port: int | None = None):
    """Run an ASGI app on loopback in a thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn_config(app, "127.0.0.1", port, log_level="critical", lifespan="on")  # as `serve` runs it
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="router-server")
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the routing server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
