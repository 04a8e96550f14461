"""A real ``redis-server`` for the tests and benchmarks that need one: started on a free loopback port, nothing
saved to disk, stopped when the block ends. ``make install`` puts the binary in with apt-get where it can (root,
Debian); without it the tests that need it skip, naming the missing binary."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time

import pytest
from llama_servers import free_port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("redis-server is not installed (make install puts it in with apt-get where it can: root, Debian)")
    return found


@contextlib.contextmanager
def redis_server(directory) -> object:
    """A real redis-server on a free loopback port, nothing saved to disk; yields a handle with ``url`` and
    ``stop()``. Stopped (if still running) when the block ends."""
    import redis

    port = free_port()
    process = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    class Handle:
        url = f"redis://127.0.0.1:{port}/0"

        @staticmethod
        def stop() -> None:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)

    try:
        deadline = time.monotonic() + 15
        client = redis.Redis(port=port, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        client.close()
        yield Handle
    finally:
        Handle.stop()


