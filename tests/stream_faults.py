"""A fault injector for streams: a loopback HTTP server that streams an OpenAI chat completion and
drops the connection mid-way.

Why not a llama.cpp server: a stock server streams to the end (or refuses up front); none can be told
to break after N chunks, which is the fault stream failover is about. So this one speaks just enough
HTTP/1.1 by hand, on a real socket, to send the response headers, ``cut_after`` SSE chunks (chunked
transfer encoding, ``gap_s`` seconds apart) and then close the socket without the terminating chunk:
what a client sees when a backend process dies or a proxy drops the connection mid-stream. Every
chunk's text is ``word{i} `` so a test can tell these chunks from a real backend's.

    with cutting_backend(cut_after=2) as base_url:   # "http://127.0.0.1:PORT/v1"
        ...
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator


def chunk_event(i: int, model: str) -> bytes:
    data = {
        "id": "cut",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}],
    }
    return f"data: {json.dumps(data)}\n\n".encode()


def http_chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class _CuttingHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                return
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            body += sock.recv(65536)
        server: CuttingServer = self.server  # type: ignore[assignment]
        server.requests.append(json.loads(body or b"{}"))
        sock.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        for i in range(server.cut_after):
            if i:
                time.sleep(server.gap_s)
            sock.sendall(http_chunk(chunk_event(i, server.model)))
        sock.shutdown(socket.SHUT_RDWR)  # no terminating 0-length chunk, no [DONE]: the stream is cut


class CuttingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, cut_after: int, gap_s: float, model: str) -> None:
        super().__init__(("127.0.0.1", 0), _CuttingHandler)
        self.cut_after, self.gap_s, self.model = cut_after, gap_s, model
        self.requests: list[dict] = []


@contextlib.contextmanager
def cutting_backend(cut_after: int = 2, *, gap_s: float = 0.0, model: str = "cut") -> Iterator[CuttingServer]:
    """Serve the fault for the block; the server's ``url`` is its base URL, ``requests`` the bodies it got."""
    server = CuttingServer(cut_after, gap_s, model)
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="cutting-backend", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
