"""Sessions in Redis, on a real ``redis-server`` started here on a free loopback port (no disk, stopped after).

The store against the in-process ``SessionStore``'s semantics (bound, TTL, use, keys, copies, counts), its
errors (bad URL, unreachable or silent server, missing client) without the password, pickling; then two routing
servers sharing one Redis, as two replicas do, with the real trained router and real llama.cpp backends: a
session keeps its model across alternating turns, and with a store per server it does not (so the check can
fail); a Redis stopped mid-run answers 503, not a 500; ``serve --session-store`` parses and refuses per_call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import random
import socket
import threading
import time
from dataclasses import replace

import pytest
from llama_servers import free_port
from redis_server import redis_server
from server_helpers import running
from test_server import openai_client, specs
from test_server_sessions import QUERIES, ask, per_call_choices, router  # noqa: F401 (fixtures)

from difficulty_router.routing.redis_sessions import INSTALL_HINT, RedisSessionStore, RedisSessionStores
from difficulty_router.routing.sessions import SessionState, SessionStore, SessionStoreUnavailable
from difficulty_router.server import create_app


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


_prefixes = iter(range(10**6))


def fresh_store(url: str, **settings) -> RedisSessionStore:
    """A store under a prefix no other test uses."""
    return RedisSessionStore(url, prefix=f"test:{next(_prefixes)}:{time.time_ns()}", **settings)


def state(model: str = "weak", turns: int = 1) -> SessionState:
    return SessionState(model=model, turns=turns, context_tokens=17, switches=0, last_seen=0.0)


# -- the store ---------------------------------------------------------------------------------------------------


def test_states_round_trip_as_json_and_come_back_as_copies(redis_url):
    import redis

    store = fresh_store(redis_url)
    sent = SessionState("gpt-4", 3, 1234, 2, 99.0, previous_model="mixtral", switches_before_turn=1)
    store.put("alice", sent)
    got = store.get("alice")
    assert replace(got, last_seen=0.0) == replace(sent, last_seen=0.0)  # every field but the use time
    assert abs(got.last_seen - time.time()) < 60  # last use, by the Redis server's clock
    got.model = "changed"  # a copy: the store's state does not change under the caller
    assert store.get("alice").model == "gpt-4"
    raw = redis.Redis.from_url(redis_url).get(f"{store.prefix}:state:alice")
    assert raw.startswith(b"{") and b"pickle" not in raw  # JSON, never pickle
    assert json.loads(raw) == {
        "model": "gpt-4",
        "turns": 3,
        "context_tokens": 1234,
        "switches": 2,
        "previous_model": "mixtral",
        "switches_before_turn": 1,
    }
    assert "alice" in store and "bob" not in store
    assert store.delete("alice") and not store.delete("alice") and store.get("alice") is None


def test_the_bound_evicts_the_least_recently_used_and_get_counts_as_use(redis_url):
    store = fresh_store(redis_url, max_sessions=2)
    other = RedisSessionStore(redis_url, prefix=store.prefix, max_sessions=2)  # a second replica's client
    store.put("a", state("a"))
    other.put("b", state("b"))
    assert store.get("a").model == "a"  # "a" is now used more recently than "b"
    other.put("c", state("c"))  # a third session: the least recently used ("b") goes
    assert [k in store for k in "abc"] == [True, False, True]
    assert store.counts() == other.counts() == {"sessions": 2, "evicted": 1, "expired": 0}
    assert len(store) == len(other) == 2


def test_a_quiet_session_expires_after_its_ttl_and_get_keeps_it_alive(redis_url):
    import redis

    store = fresh_store(redis_url, ttl_s=1.5)
    store.put("kept", state())
    store.put("quiet", state())
    for _ in range(4):  # 2 s in all, more than the TTL: each get renews "kept" (1 s of slack for a slow machine)
        time.sleep(0.5)
        assert store.get("kept") is not None
    assert store.get("quiet") is None
    assert store.counts() == {"sessions": 1, "evicted": 0, "expired": 1}
    time.sleep(1.6)
    client = redis.Redis.from_url(redis_url)
    # before any call of the store could delete it: Redis's own key expiry removed the state
    assert client.exists(f"{store.prefix}:state:kept") == 0
    assert len(store) == 0 and store.counts()["expired"] == 2


def test_the_same_operations_give_the_same_answers_as_the_in_process_store(redis_url):
    """A random mix of put / get / delete / len over more sessions than the bound: the Redis store answers
    every call as SessionStore does, and drops as many sessions."""
    rng = random.Random(0)
    local, shared = SessionStore(max_sessions=5), fresh_store(redis_url, max_sessions=5)
    for step in range(300):
        key = f"s{rng.randrange(9)}"
        op = rng.choice(["put", "put", "get", "get", "delete", "len"])
        if op == "put":
            s = state(f"m{step}", turns=step)
            local.put(key, s)
            shared.put(key, s)
        elif op == "get":
            a, b = local.get(key), shared.get(key)
            assert (a is None) == (b is None) and (a is None or replace(a, last_seen=0) == replace(b, last_seen=0))
        elif op == "delete":
            assert local.delete(key) == shared.delete(key), step
        else:
            assert len(local) == len(shared), step
    assert shared.counts() == {"sessions": len(local), "evicted": local.evicted, "expired": 0}


def test_keys_and_states_are_checked_as_the_in_process_store_checks_them(redis_url):
    store = fresh_store(redis_url)
    for bad, error in (("", ValueError), ("x" * 600, ValueError), (7, TypeError)):
        for call in (lambda k: store.get(k), lambda k: store.put(k, state()), lambda k: store.delete(k)):
            with pytest.raises(error, match="session key"):
                call(bad)
    with pytest.raises(TypeError, match="state must be a SessionState"):
        store.put("a", {"model": "weak"})
    with pytest.raises(ValueError, match="max_sessions must be an integer >= 1"):
        RedisSessionStore(redis_url, max_sessions=0)
    with pytest.raises(ValueError, match="ttl_s must be a positive finite number"):
        RedisSessionStore(redis_url, ttl_s=-1)
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        RedisSessionStore(redis_url, timeout_s=0)


def test_a_state_another_program_wrote_is_dropped_and_the_session_begins_again(redis_url, caplog):
    """Never unpickled, never a 503 at every turn: the session begins again and the log names the store. A state
    written without a later-added field (an older version) is read with that field's default."""
    import redis

    client = redis.Redis.from_url(redis_url)
    store = fresh_store(redis_url)
    store.put("a", state())
    client.set(f"{store.prefix}:state:a", b"\x80\x04pickled")
    with caplog.at_level(logging.WARNING, logger="difficulty_router.routing.redis_sessions"):
        assert store.get("a") is None
    assert "not a session state" in caplog.text and client.exists(f"{store.prefix}:state:a") == 0
    assert "a" not in store and store.counts()["sessions"] == 0
    store.put("b", state("strong"))
    client.set(f"{store.prefix}:state:b", json.dumps({"model": "strong", "turns": 2, "context_tokens": 5, "switches": 0}))
    got = store.get("b")
    assert (got.model, got.turns, got.previous_model, got.switches_before_turn) == ("strong", 2, None, 0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://:hunter2@127.0.0.1:6379/0", r"must start with one of redis://, rediss://, unix://"),
        ("redis://:hunter2@127.0.0.1:port/0", r"is not a valid URL"),
        ("redis://:hunter2@/0", r"names no host"),
        ("redis://:hunter2@127.0.0.1:6379/zero", r"the database must be a number"),
        ("", r"needs a URL"),
    ],
)
def test_a_bad_url_is_refused_without_its_password(url, message):
    with pytest.raises(ValueError, match=message) as caught:
        RedisSessionStore(url)
    assert "hunter2" not in str(caught.value)


def test_an_unreachable_server_fails_by_name_and_address_without_the_password():
    port = free_port()  # nothing listens there
    store = RedisSessionStore(f"redis://:hunter2@127.0.0.1:{port}/0", prefix="p")
    assert "hunter2" not in repr(store) and "***" in repr(store)
    started = time.monotonic()
    with pytest.raises(SessionStoreUnavailable) as caught:
        store.get("a")
    assert time.monotonic() - started < 3  # refused at once, not after retries with back-off
    assert f"the Redis session store at redis://:***@127.0.0.1:{port}/0 (prefix 'p') failed" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    stores = RedisSessionStores(f"redis://:hunter2@127.0.0.1:{port}/0")
    assert "hunter2" not in repr(stores)
    with pytest.raises(SessionStoreUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1") as caught:
        stores.ping()
    assert "hunter2" not in str(caught.value)


def test_clear_forgets_its_own_prefix_only_even_one_with_glob_characters(redis_url):
    """A router named with * or ? must not clear another router's sessions (the prefix is escaped in SCAN)."""
    base = f"test:glob:{time.time_ns()}"
    star, plain = RedisSessionStore(redis_url, prefix=f"{base}:r*"), RedisSessionStore(redis_url, prefix=f"{base}:rx")
    star.put("a", state())
    plain.put("a", state("strong"))
    star.clear()
    assert "a" not in star and plain.get("a").model == "strong"
    plain.clear()


def test_a_server_that_does_not_answer_times_out_as_configured():
    with socket.socket() as listener:  # accepts connections and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        held = []
        threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
        store = RedisSessionStore(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(SessionStoreUnavailable, match="Timeout"):
            store.get("a")
        assert 0.9 < time.monotonic() - started < 1.9  # one wait of timeout_s: a retried timeout would take 2 s


def test_the_store_pickles_as_its_url_and_settings_not_a_connection(redis_url):
    store = fresh_store(redis_url, max_sessions=7, ttl_s=30.0, timeout_s=2.0)
    store.put("a", state("pickled"))
    data = pickle.dumps(store)
    assert b"ConnectionPool" not in data and b"socket" not in data and len(data) < 1000
    copy = pickle.loads(data)
    assert copy._client is not store._client and copy.settings() == store.settings()
    assert copy.get("a").model == "pickled"  # the copy opened its own connection to the same sessions
    stores = pickle.loads(pickle.dumps(RedisSessionStores(redis_url, max_sessions=3, ttl_s=9.0, prefix="p")))
    one = stores("router")
    assert (one.prefix, one.max_sessions, one.ttl_s) == ("p:router", 3, 9.0)


def test_without_the_redis_client_the_store_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ValueError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        RedisSessionStore("redis://127.0.0.1:6379/0")


# -- two servers (as two replicas) sharing one Redis --------------------------------------------------------------


def alternating_turns(apps) -> list[tuple[str, str, str]]:
    """The session's turns, taken by the apps in turn: (model, session action, session turn) of each."""
    out = []
    with contextlib.ExitStack() as stack:
        clients = [openai_client(stack.enter_context(running(app))) for app in apps]
        for turn in range(1, len(QUERIES) + 1):
            completion, headers = ask(clients[(turn - 1) % len(clients)], turn, user="carol")
            out.append((completion.model, headers["x-router-session-action"], headers["x-router-session-turn"]))
    return out


def check_one_session(turns, first_model) -> None:
    assert [t[0] for t in turns] == [first_model] * len(QUERIES)
    assert [t[1] for t in turns] == ["first"] + ["kept"] * (len(QUERIES) - 1)
    assert [t[2] for t in turns] == [str(t) for t in range(1, len(QUERIES) + 1)]


def test_two_servers_sharing_redis_keep_a_session_on_its_model(router, llama_backends, per_call_choices, redis_url):  # noqa: F811
    import redis

    stores = RedisSessionStores(redis_url, prefix=f"test:two-servers:{time.time_ns()}", max_sessions=100)
    sticky = {"session_policy": "sticky", "session_margin": 1.0}
    shared = [create_app(router, specs(llama_backends), session_store=stores, **sticky) for _ in range(2)]
    redis_client = redis.Redis.from_url(redis_url)
    connected = redis_client.info("clients")["connected_clients"]
    turns = alternating_turns(shared)
    check_one_session(turns, per_call_choices[0])
    # the servers stopped: their stores' connections went with them (only this check's client is left)
    assert redis_client.info("clients")["connected_clients"] <= connected
    assert stores("router").get("carol").turns == len(QUERIES)

    # the same check with a store per server (what separate processes have without a shared store) fails:
    # each server's second turn of the session is that server's first
    separate = [create_app(router, specs(llama_backends), **sticky) for _ in range(2)]
    apart = alternating_turns(separate)
    assert [t[2] for t in apart] == ["1", "1", "2", "2"]
    with pytest.raises(AssertionError):
        check_one_session(apart, per_call_choices[0])


def test_a_redis_stopped_mid_run_gets_a_clean_503(router, llama_backends, tmp_path, caplog):  # noqa: F811
    import openai

    with redis_server(tmp_path) as server:
        app = create_app(
            router, specs(llama_backends), session_policy="sticky", session_store=RedisSessionStores(server.url)
        )
        with running(app) as url:
            client = openai_client(url)
            _, headers = ask(client, 1, user="dave")
            assert headers["x-router-session-turn"] == "1"
            server.stop()
            with pytest.raises(openai.APIStatusError) as caught:
                ask(client, 2, user="dave")
            assert client.models.list().data  # the server itself goes on
            ask(client, 1)  # and a request without a session is still served
    error = caught.value
    assert error.status_code == 503
    body = error.response.json()["error"]
    assert body["code"] == "session_store_unavailable" and body["type"] == "api_error"
    assert "session store is unavailable" in body["message"] and "Traceback" not in error.response.text
    request_id = error.response.headers["x-request-id"]
    assert request_id in body["message"]
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert any("the Redis session store at redis://127.0.0.1" in m for m in logged)  # the cause, in the log


# -- the command line ---------------------------------------------------------------------------------------------


def serve_args(*extra: str):
    from difficulty_router.cli.main import build_parser

    return build_parser().parse_args(["serve", "--pool", "pool.json", "--router", "r", *extra])


def test_serve_takes_a_session_store_and_refuses_it_under_per_call(redis_url, tmp_path, capsys):
    from difficulty_router.cli.main import main
    from difficulty_router.cli.serve import session_store_choice

    args = serve_args(
        "--session-store", redis_url, "--session-policy", "sticky", "--max-sessions", "5", "--session-ttl", "60"
    )
    stores = session_store_choice(args)
    assert isinstance(stores, RedisSessionStores) and stores.url == redis_url
    assert stores("router").max_sessions == 5 and stores("router").ttl_s == 60.0
    assert session_store_choice(serve_args("--session-policy", "sticky")) is None  # default: in this process

    pool = tmp_path / "pool.json"  # never read: the refusals come first
    for extra, message in (
        (["--session-store", redis_url], "--session-store: --session-policy per_call keeps no sessions"),
        (
            ["--session-store", f"redis://:hunter2@127.0.0.1:{free_port()}/0", "--session-policy", "sticky"],
            "the Redis session store at redis://:***@127.0.0.1",
        ),
        (["--session-store", "redis://:hunter2@127.0.0.1:x/0", "--session-policy", "sticky"], "not a valid URL"),
    ):
        assert main(["serve", "--pool", str(pool), "--router", "r", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "hunter2" not in err, err
