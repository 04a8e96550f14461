"""OpenAI-compatible backends: one async client each, all sharing one pooled HTTP connection pool.

The pool file says where each model is served (``base_url``, ``model``, ``api_key_env``,
``timeout``). Calls go through the ``openai`` package's async client with retries turned
off: the server's own retry is escalation to the next more capable backend, which is both
faster and more likely to succeed than hammering a backend that just failed. Failures are
classified here so the app decides in one place what escalates and what goes back to the
client: a 400/413/422 from a backend means the request itself is wrong (every backend
would refuse it), anything else (connection refused, timeout, 5xx, 429, 401/403/404 from a
misconfigured backend) is the backend's problem and escalates.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difficulty_router.core.pool import ModelPool, PoolModel

if TYPE_CHECKING:
    import httpx

DEFAULT_TIMEOUT = 60.0
CLIENT_ERRORS = frozenset({400, 413, 422})
#: Seconds the pool keeps an idle backend connection. Shorter than the keep-alive of the servers backends
#: run on (uvicorn, hence vLLM and llama-cpp-python's server, and llama.cpp's own: 5 s): the side that sends
#: must give up on an idle connection first, or a request sent as the backend closes it is lost (a reset
#: connection, which would also mark a healthy backend down). httpx's default (5 s) equals theirs.
BACKEND_KEEPALIVE_S = 2.0


@dataclass(frozen=True)
class BackendSpec:
    """Where one pool model is served."""

    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_pool_model(cls, m: PoolModel) -> BackendSpec:
        if m.base_url is None:
            raise ValueError(
                f"pool model {m.name!r} has no base_url; the server needs one per model "
                f"(an OpenAI-compatible endpoint such as http://127.0.0.1:8080/v1)"
            )
        return cls(m.name, m.base_url, m.served_model, m.api_key_env, m.timeout or DEFAULT_TIMEOUT)


def specs_from_pool(pool: ModelPool) -> list[BackendSpec]:
    """Backends for every model of a pool; refuses a pool in which a model has no base_url."""
    missing = [m.name for m in pool.models if m.base_url is None]
    if missing:
        raise ValueError(
            f"pool models {missing} have no base_url; `serve` needs an OpenAI-compatible endpoint "
            f"for each model (pool fields: base_url, model, api_key_env, timeout)"
        )
    return [BackendSpec.from_pool_model(m) for m in pool.models]


class BackendFailure(Exception):
    """A failed backend call: ``kind`` for metrics, ``escalate`` whether another backend may succeed."""

    def __init__(self, backend: str, kind: str, message: str, *, status: int = 502, escalate: bool = True) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend, self.kind, self.status, self.escalate, self.detail = backend, kind, status, escalate, message

    @property
    def transient(self) -> bool:
        """Read by :func:`difficulty_router.core.errors.is_transient_error`: the dispatch core's one rule."""
        return self.escalate


def classify(backend: str, exc: Exception) -> BackendFailure:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return BackendFailure(backend, "timeout", "timed out", status=504)
    if isinstance(exc, openai.APIConnectionError):
        return BackendFailure(backend, "connection", f"connection failed ({exc.__cause__ or exc})")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = exc.message
        if status in CLIENT_ERRORS:
            return BackendFailure(backend, f"http_{status}", message, status=status, escalate=False)
        return BackendFailure(backend, f"http_{status}", f"HTTP {status}: {message}")
    return BackendFailure(backend, "error", f"{type(exc).__name__}: {exc}")


class Backends:
    """The set of backends; ``start`` inside the serving event loop, ``aclose`` at shutdown.

    A backend that fails with a connection error or a timeout is marked down for
    ``cooldown`` seconds; routers leave it out of their decisions meanwhile (recorded in the
    decision's ``skipped``), so a dead backend costs one failed call, not one per request.
    """

    def __init__(self, specs: Iterable[BackendSpec], *, max_connections: int = 256, cooldown: float = 5.0) -> None:
        self.specs = {s.name: s for s in specs}
        if not self.specs:
            raise ValueError("no backends configured")
        self.max_connections = max_connections
        self.cooldown = cooldown
        self._clients: dict[str, Any] = {}
        self._http: httpx.AsyncClient | None = None
        self._down_until: dict[str, float] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def _api_key(self, spec: BackendSpec) -> str:
        if spec.api_key_env is None:
            return "not-needed"  # local OpenAI-compatible servers usually take any key
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise ValueError(f"backend {spec.name!r}: environment variable {spec.api_key_env} is not set")
        return key

    async def start(self) -> None:
        import httpx
        from openai import AsyncOpenAI

        keys = {name: self._api_key(spec) for name, spec in self.specs.items()}  # fail before opening anything
        limits = httpx.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=self.max_connections,
            keepalive_expiry=BACKEND_KEEPALIVE_S,
        )
        self._http = httpx.AsyncClient(limits=limits, timeout=DEFAULT_TIMEOUT)
        for name, spec in self.specs.items():
            self._clients[name] = AsyncOpenAI(
                base_url=spec.base_url, api_key=keys[name], timeout=spec.timeout, max_retries=0, http_client=self._http
            )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._clients.clear()

    # -- health ----------------------------------------------------------------------
    def down(self) -> dict[str, str]:
        now = time.monotonic()
        return {
            n: f"backend down (failed {self.cooldown - (t - now):.1f} s ago)"
            for n, t in self._down_until.items()
            if t > now
        }

    def _record(self, name: str, failure: BackendFailure | None) -> None:
        if failure is None:
            self._down_until.pop(name, None)
        elif failure.kind in ("connection", "timeout"):
            self._down_until[name] = time.monotonic() + self.cooldown

    # -- calls -----------------------------------------------------------------------
    def _request(self, name: str, body: dict) -> dict:
        spec = self.specs[name]
        extra = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
        return {"model": spec.model, "messages": body["messages"], "extra_body": extra or None}

    def _failure(self, name: str, exc: Exception) -> BackendFailure:
        """The call to ``name`` failed: classify the error, count it against the backend, and return it to raise."""
        failure = classify(name, exc)
        self._record(name, failure)
        return failure

    async def complete(self, name: str, body: dict) -> dict:
        """One non-streamed completion, as the backend's JSON (model field untouched)."""
        try:
            response = await self._clients[name].chat.completions.create(stream=False, **self._request(name, body))
        except Exception as exc:
            raise self._failure(name, exc) from exc
        self._record(name, None)
        return response.model_dump(mode="json", exclude_unset=True)

    async def stream(self, name: str, body: dict) -> AsyncIterator[dict]:
        """A backend's stream, each chunk as its JSON; every failure (opening it, or a break mid-way:
        kind ``stream_broken``) is a :class:`BackendFailure`, so the dispatch core decides in one
        place whether it escalates. Closing the iterator closes the backend's response."""
        stream = None
        try:
            try:
                stream = await self._clients[name].chat.completions.create(stream=True, **self._request(name, body))
            except Exception as exc:
                raise self._failure(name, exc) from exc
            self._record(name, None)
            try:
                async for chunk in stream:
                    yield chunk.model_dump(mode="json", exclude_unset=True)
            except Exception as exc:
                raise BackendFailure(name, "stream_broken", f"the stream broke ({type(exc).__name__})") from exc
        finally:
            if stream is not None:
                await stream.close()
