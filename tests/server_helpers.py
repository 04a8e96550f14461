"""Run the routing app under a real uvicorn server on a loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Iterator

from llama_servers import free_port

from difficulty_router import Policy


@contextlib.contextmanager
def running(app, *, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 for the block; yields ``http://127.0.0.1:PORT``."""
    import uvicorn

    from difficulty_router.server.run import uvicorn_config

    config = uvicorn_config(app, "127.0.0.1", free_port(), log_level="warning", lifespan="on")  # as `serve` runs it
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def with_policy(router, kind: str, value: float):
    """A shallow copy of ``router`` with another policy (the session router stays untouched).

    threshold 0 always picks the cheapest model; the utility rule with a huge lambda does too.
    """
    clone = copy.copy(router)
    clone.policy = Policy(kind, value)
    return clone
