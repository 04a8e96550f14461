"""Sessions in Redis: every server process, or Ray Serve replica, pointed at one Redis shares them.

:class:`RedisSessionStore` is a :class:`~difficulty_router.routing.sessions.SessionStates` with the in-process
:class:`~difficulty_router.routing.sessions.SessionStore`'s semantics, kept in Redis so that separate processes
see one set of sessions: at most ``max_sessions`` (the least recently used go first), each forgotten
``ttl_s`` seconds after its last use, ``get`` counting as use, keys checked, states copied in and out.

In Redis, under ``prefix`` (one per router):

- ``<prefix>:state:<session key>``: the state as JSON (never pickle), expiring ``ttl_s`` after its last use
  (Redis's own key expiry, refreshed by every ``get`` and ``put``);
- ``<prefix>:lru``: a sorted set of session keys by last use (microseconds of the Redis server's clock,
  strictly increasing, so replicas on machines with different clocks agree on the order); sessions past
  their TTL leave it (counted as expired) at the next call of any process, as they leave the in-process store;
- ``<prefix>:evicted`` / ``<prefix>:expired``: how many sessions were dropped for a full store or a passed
  TTL, counted by whichever process dropped them, so every replica reads the same counts.

Every operation is one Lua script, so the bound and the TTL hold atomically whichever replica calls.
``last_seen`` of a returned state is the Redis server's clock (seconds since the epoch). Limits: as with the
Ray actor's store, two turns of one session decided at the same moment on two replicas both read the earlier
state and the later write wins; a standalone Redis (or a primary), not Redis Cluster (the scripts touch keys
they derive). A store's keys outlive the servers that used it (the states expire; the index, at most
``max_sessions`` keys, and the counts stay): :meth:`RedisSessionStore.clear` removes them. The ``redis``
client is imported only when a store opens: ``pip install 'difficulty-router[redis]'``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, fields
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from difficulty_router.routing.sessions import SessionState, SessionStore, SessionStoreUnavailable, check_key

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'difficulty-router[redis]'"
DEFAULT_PREFIX = "difficulty-router:sessions"
#: seconds to wait for a connection, and for each answer, before the call fails (the server then answers 503)
CONNECT_TIMEOUT_S = 3.0
TIMEOUT_S = 5.0
SCHEMES = ("redis", "rediss", "unix")
_STATE_FIELDS = tuple(f.name for f in fields(SessionState) if f.name != "last_seen")

# KEYS: lru, evicted, expired[, state]; ARGV: state key prefix, ttl (us), ttl (ms), ...
# `now` is the server's clock in microseconds; `stamp` is now, or just past the newest use when that is later
# (two calls in one microsecond, or a clock step back), so the LRU order is the order of the calls.
_PRELUDE = """
local lru, evicted, expired = KEYS[1], KEYS[2], KEYS[3]
local prefix, ttl_us, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cutoff = string.format('%.0f', now - ttl_us)
local old = redis.call('ZRANGEBYSCORE', lru, '-inf', cutoff)
if #old > 0 then
  for _, k in ipairs(old) do redis.call('DEL', prefix .. k) end
  redis.call('ZREMRANGEBYSCORE', lru, '-inf', cutoff)
  redis.call('INCRBY', expired, #old)
end
local function stamp()
  local newest = redis.call('ZRANGE', lru, -1, -1, 'WITHSCORES')
  local s = now
  if #newest > 0 and tonumber(newest[2]) >= s then s = tonumber(newest[2]) + 1 end
  return s
end
"""
# ARGV[4]: the session key. Returns {state JSON, now in us} or nil.
_GET = (
    _PRELUDE
    + """
local member = ARGV[4]
local state = redis.call('GET', KEYS[4])
if not state then
  if redis.call('ZREM', lru, member) == 1 then redis.call('INCR', expired) end
  return false
end
local s = stamp()
redis.call('ZADD', lru, string.format('%.0f', s), member)
redis.call('PEXPIRE', KEYS[4], ttl_ms)
return {state, string.format('%.0f', s)}
"""
)
# ARGV[4]: the session key, ARGV[5]: the state JSON, ARGV[6]: max_sessions. Returns the sessions evicted.
_PUT = (
    _PRELUDE
    + """
local member = ARGV[4]
redis.call('SET', KEYS[4], ARGV[5], 'PX', ttl_ms)
redis.call('ZADD', lru, string.format('%.0f', stamp()), member)
local over = redis.call('ZCARD', lru) - tonumber(ARGV[6])
if over > 0 then
  local popped = redis.call('ZPOPMIN', lru, over)
  for i = 1, #popped, 2 do redis.call('DEL', prefix .. popped[i]) end
  redis.call('INCRBY', evicted, over)
end
return math.max(over, 0)
"""
)
# ARGV[4]: the session key. Returns 1 when it was held.
_DELETE = (
    _PRELUDE
    + """
local held = redis.call('ZREM', lru, ARGV[4])
redis.call('DEL', KEYS[4])
return held
"""
)
# Returns {sessions, evicted, expired}.
_COUNTS = (
    _PRELUDE
    + """
local held = redis.call('ZCARD', lru)
return {held, tonumber(redis.call('GET', evicted) or '0'), tonumber(redis.call('GET', expired) or '0')}
"""
)


def require_redis():
    """Import the ``redis`` client, or say how to install it."""
    try:
        import redis
    except ImportError:
        raise ValueError(f"the Redis session store needs its extra (redis is missing): {INSTALL_HINT}") from None
    return redis


def redacted(url: str) -> str:
    """``url`` as it may be shown: the password (and any query, which may carry one) left out."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<an unparsable URL>"
    user = parts.username or ""
    auth = f"{user}:***@" if parts.password is not None else (f"{user}@" if user else "")
    where = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{auth}{where}{f':{port}' if port is not None else ''}{parts.path}"


def secrets_of(url: str) -> list[str]:
    """The passwords ``url`` carries (in its user part, as written and percent-decoded, and in a ``password``
    query argument, which the redis client also reads), longest first, to hide in any message."""
    parts = urlsplit(url)
    found = {parts.password, unquote(parts.password or ""), *parse_qs(parts.query).get("password", [])}
    return sorted((s for s in found if s), key=len, reverse=True)


def glob_escaped(text: str) -> str:
    """``text`` as a literal in a Redis SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def check_url(url: Any) -> str:
    """A Redis URL: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix://path``."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"the Redis session store needs a URL such as redis://host:6379/0, got {url!r}")
    shown = redacted(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError(f"the Redis session store's URL {shown} is not a valid URL (a bad port?)") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"the Redis session store's URL {shown} must start with one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError(f"the Redis session store's URL {shown} names no host (redis://host:6379/0)")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"the Redis session store's URL {shown}: the database must be a number, got {db!r}")
    elif not parts.path:
        raise ValueError(f"the Redis session store's URL {shown} names no socket path (unix:///path/to/redis.sock)")
    return url


class RedisSessionStore:
    """Session states in the Redis at ``url`` under ``prefix`` (see the module docstring); every process that
    opens the same URL and prefix shares them. ``max_sessions`` and ``ttl_s`` as :class:`SessionStore`'s;
    ``connect_timeout_s`` / ``timeout_s``: how long a call waits to connect and for each answer.

    A bad URL is refused here; the server is first reached at the first call (or :meth:`ping`). A call that
    cannot reach Redis, times out or gets an error raises :class:`SessionStoreUnavailable` naming the store
    and its address, without the password. The store pickles as its URL and settings (a Ray replica that
    unpickles it opens its own connections)."""

    blocking = True  # each call is a round trip to Redis: the server calls it off its event loop

    def __init__(
        self,
        url: str,
        *,
        max_sessions: int = 10_000,
        ttl_s: float = 3600.0,
        prefix: str = f"{DEFAULT_PREFIX}:router",
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        SessionStore(max_sessions=max_sessions, ttl_s=ttl_s)  # the in-process store's checks, with its messages
        self.url = check_url(url)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        for name, value in (("connect_timeout_s", connect_timeout_s), ("timeout_s", timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self.max_sessions, self.ttl_s, self.prefix = max_sessions, float(ttl_s), prefix
        self.connect_timeout_s, self.timeout_s = float(connect_timeout_s), float(timeout_s)
        self.address = redacted(url)
        self._secrets = secrets_of(url)
        redis = require_redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            self._client = redis.Redis.from_url(
                url,
                socket_connect_timeout=self.connect_timeout_s,
                socket_timeout=self.timeout_s,
                # one retry, at once, when a pooled connection was closed by the server meanwhile; a timeout
                # fails the call at once (retrying would double the wait of a request)
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
                decode_responses=False,  # bytes: a state that is not UTF-8 JSON is refused below, by name
            )
        except ValueError:
            raise ValueError(f"the Redis session store's URL {self.address} was refused by the redis client") from None
        self._redis_error = redis.exceptions.RedisError
        self._keys = [f"{prefix}:lru", f"{prefix}:evicted", f"{prefix}:expired"]
        ttl_us = max(1, round(self.ttl_s * 1e6))
        self._argv = [f"{prefix}:state:", ttl_us, max(1, math.ceil(ttl_us / 1000))]
        self._get = self._client.register_script(_GET)
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._counts = self._client.register_script(_COUNTS)

    def __repr__(self) -> str:
        return (
            f"RedisSessionStore({self.address!r}, prefix={self.prefix!r}, max_sessions={self.max_sessions}, "
            f"ttl_s={self.ttl_s:g})"
        )

    def _fail(self, exc: BaseException) -> SessionStoreUnavailable:
        message = str(exc) or type(exc).__name__
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return SessionStoreUnavailable(
            f"the Redis session store at {self.address} (prefix {self.prefix!r}) failed: "
            f"{type(exc).__name__}: {message}"
        )

    def _run(self, script, key: str | None, *argv: Any) -> Any:
        keys = [*self._keys, f"{self.prefix}:state:{key}"] if key is not None else self._keys
        try:
            return script(keys=keys, args=[*self._argv, *argv])
        except self._redis_error as exc:
            raise self._fail(exc) from None

    def ping(self) -> None:
        """Reach the server now (a command checks its URL before serving); raises as a failed call does."""
        try:
            self._client.ping()
        except self._redis_error as exc:
            raise self._fail(exc) from None

    def get(self, key: str) -> SessionState | None:
        check_key(key)
        found = self._run(self._get, key, key)
        if found is None:
            return None
        text, stamp = found
        try:
            data = json.loads(text)
            # a field a state written by an older version lacks takes its default (a rolling upgrade reads on)
            return SessionState(
                **{name: data[name] for name in _STATE_FIELDS if name in data}, last_seen=int(stamp) / 1e6
            )
        except (ValueError, TypeError, KeyError):
            # refusing it would answer 503 at every turn until its TTL passed (each read renews it): the session
            # begins again instead, and the log says what was there
            log.warning(
                "the Redis session store at %s held something that is not a session state under %s:state:<a key>; "
                "dropped it, the session begins again (another program writing under the prefix %r?)",
                self.address,
                self.prefix,
                self.prefix,
            )
            self.delete(key)
            return None

    def put(self, key: str, state: SessionState) -> None:
        check_key(key)
        if not isinstance(state, SessionState):
            raise TypeError(f"state must be a SessionState, got {type(state).__name__}")
        data = {name: value for name, value in asdict(state).items() if name != "last_seen"}
        self._run(self._put, key, key, json.dumps(data, separators=(",", ":")), self.max_sessions)

    def delete(self, key: str) -> bool:
        """Forget a session (the conversation ended); True when it was held."""
        check_key(key)
        return bool(self._run(self._delete, key, key))

    def counts(self) -> dict[str, int]:
        """Sessions held, evicted (store full) and expired (TTL passed), over every process sharing the store."""
        sessions, evicted, expired = self._run(self._counts, None)
        return {"sessions": int(sessions), "evicted": int(evicted), "expired": int(expired)}

    def clear(self) -> None:
        """Forget every session under this prefix, and the counts."""
        try:
            pattern = f"{glob_escaped(self.prefix)}:state:*"  # a prefix with * or ? must not match other routers'
            names = [*self._client.scan_iter(match=pattern, count=1000)]
            for start in range(0, len(names), 1000):
                self._client.delete(*names[start : start + 1000])
            self._client.delete(*self._keys)
        except self._redis_error as exc:
            raise self._fail(exc) from None

    def close(self) -> None:
        """Close this client's connections (another call opens them again)."""
        self._client.close()

    def __len__(self) -> int:
        return self.counts()["sessions"]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(key) and self.get(key) is not None

    def settings(self) -> dict[str, Any]:
        return {
            "max_sessions": self.max_sessions,
            "ttl_s": self.ttl_s,
            "prefix": self.prefix,
            "connect_timeout_s": self.connect_timeout_s,
            "timeout_s": self.timeout_s,
        }

    def __reduce__(self):
        # the URL and settings, never a connection: whoever unpickles it opens its own
        return (_reopen, (self.url, self.settings()))


def _reopen(url: str, settings: dict[str, Any]) -> RedisSessionStore:
    return RedisSessionStore(url, **settings)


class RedisSessionStores:
    """One :class:`RedisSessionStore` per router, for :func:`~difficulty_router.server.create_app`'s
    ``session_store``: ``stores(router_name)`` opens the store under ``<prefix>:<router_name>``. Holds only the
    URL and settings, so it pickles to Ray Serve's replicas, each of which opens its own connections."""

    def __init__(
        self,
        url: str,
        *,
        max_sessions: int = 10_000,
        ttl_s: float = 3600.0,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.url = url
        self.settings: dict[str, Any] = {
            "max_sessions": max_sessions,
            "ttl_s": ttl_s,
            "connect_timeout_s": connect_timeout_s,
            "timeout_s": timeout_s,
        }
        self.prefix = prefix
        self.address = redacted(url) if isinstance(url, str) else repr(url)
        RedisSessionStore(url, prefix=prefix, **self.settings).close()  # its checks now, before any server starts

    def __call__(self, router: str) -> RedisSessionStore:
        return RedisSessionStore(self.url, prefix=f"{self.prefix}:{router}", **self.settings)

    def ping(self) -> None:
        """Reach the server now; raises :class:`SessionStoreUnavailable` naming its address when it cannot."""
        store = RedisSessionStore(self.url, prefix=self.prefix, **self.settings)
        try:
            store.ping()
        finally:
            store.close()

    def __repr__(self) -> str:
        return f"RedisSessionStores({self.address!r}, prefix={self.prefix!r}, {self.settings})"
