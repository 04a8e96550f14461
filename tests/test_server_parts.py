"""The server's parts on their own: micro-batching, pool backend fields, serve's refusals, metrics text."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from difficulty_router import ModelPool
from difficulty_router.cli.main import main
from difficulty_router.server import MicroBatcher, ServerMetrics, specs_from_pool
from difficulty_router.server.run import check_exposure, is_loopback
from difficulty_router.server.schema import ApiError, validate_chat_request

# -- micro-batching -------------------------------------------------------------------

class Recorder:
    """A batch function that records its calls and holds the worker thread for ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[list, object]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, values, key):
        self.calls.append((list(values), key))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)  # a blocking forward pass
        return [v * 10 for v in values]


@pytest.mark.asyncio
async def test_concurrent_submissions_share_one_call():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=32, max_wait=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    await batcher.aclose()
    assert results == [i * 10 for i in range(10)]
    assert [values for values, _ in fn.calls] == [list(range(10))]
    assert fn.threads and threading.current_thread().name not in fn.threads  # ran off the event loop thread


@pytest.mark.asyncio
async def test_batches_are_bounded_and_grouped_by_key():
    fn = Recorder()
    sizes = []
    batcher = MicroBatcher(fn, max_batch=4, max_wait=0.05, on_batch=lambda n, s: sizes.append(n))
    results = await asyncio.gather(*(batcher.submit(i, key="a" if i % 2 else "b") for i in range(8)))
    await batcher.aclose()
    assert results == [i * 10 for i in range(8)]
    assert all(len(values) <= 4 for values, _ in fn.calls) and sum(sizes) == 8
    for values, key in fn.calls:
        assert all((v % 2 == 1) == (key == "a") for v in values)


@pytest.mark.asyncio
async def test_max_batch_one_decides_one_by_one():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=1, max_wait=0.05)
    await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    await batcher.aclose()
    assert [len(values) for values, _ in fn.calls] == [1] * 5


@pytest.mark.asyncio
async def test_the_event_loop_keeps_running_during_a_batch():
    fn = Recorder(delay=0.3)
    batcher = MicroBatcher(fn, max_batch=8, max_wait=0.0)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    assert await batcher.submit(1) == 10
    task.cancel()
    await batcher.aclose()
    assert ticks >= 10  # about 30 expected while the worker thread slept 0.3 s


@pytest.mark.asyncio
async def test_a_failing_batch_fails_only_the_query_that_broke_it_and_the_batcher_goes_on():
    """A failed batch is decided again item by item: only the caller whose query breaks ``fn`` gets the error
    (issue 31: a conversation the router refused failed every request batched with it with a 500)."""
    calls = []

    def fn(values, key):
        calls.append(list(values))
        if "bad" in values:
            raise RuntimeError("extractor exploded")
        return values

    batcher = MicroBatcher(fn, max_batch=8, max_wait=0.05)
    outcomes = await asyncio.gather(batcher.submit(1), batcher.submit("bad"), batcher.submit(2), return_exceptions=True)
    assert outcomes[0] == 1 and outcomes[2] == 2
    assert isinstance(outcomes[1], RuntimeError) and "exploded" in str(outcomes[1])
    assert calls == [[1, "bad", 2], [1], ["bad"], [2]]
    assert await batcher.submit(3) == 3
    await batcher.aclose()


@pytest.mark.asyncio
async def test_a_crashing_on_batch_callback_neither_kills_the_worker_nor_strands_callers():
    """Issue 21: an exception from the batch callback used to end the worker task, and every caller
    of that batch (and all later ones) waited forever."""
    def explode(size, seconds):
        raise RuntimeError("metrics backend gone")

    batcher = MicroBatcher(Recorder(), max_batch=8, max_wait=0.01, on_batch=explode)
    assert await asyncio.wait_for(asyncio.gather(batcher.submit(1), batcher.submit(2)), 5) == [10, 20]
    assert await asyncio.wait_for(batcher.submit(3), 5) == 30
    await batcher.aclose()


@pytest.mark.asyncio
async def test_a_full_queue_refuses_at_once_and_a_late_item_is_dropped_unrun():
    from difficulty_router.server.batching import DeadlineExceeded, QueueFull

    fn = Recorder(delay=0.4)
    batcher = MicroBatcher(fn, max_batch=1, max_wait=0.0, max_queue=2, timeout=0.6)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    await asyncio.sleep(0.5)  # let the worker reach the expired item
    await batcher.aclose()
    kinds = [type(o).__name__ if isinstance(o, Exception) else "ok" for o in outcomes]
    assert kinds.count("QueueFull") >= 3 and "DeadlineExceeded" in kinds and kinds[0] == "ok", kinds
    assert all(isinstance(o, (int, QueueFull, DeadlineExceeded)) for o in outcomes)
    ran = [v for values, _ in fn.calls for v in values]
    expired = [i for i, o in enumerate(outcomes) if isinstance(o, DeadlineExceeded)]
    assert not set(ran) & set(expired[1:]), "an item whose caller gave up was still decided"


def test_batcher_refuses_bad_bounds():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda v, k: v, max_batch=0)
    with pytest.raises(ValueError, match="max_wait"):
        MicroBatcher(lambda v, k: v, max_wait=-1)
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(lambda v, k: v, max_queue=0)
    with pytest.raises(ValueError, match="timeout"):
        MicroBatcher(lambda v, k: v, timeout=0)


# -- pool backend fields --------------------------------------------------------------

def pool(**fields):
    return {"models": [{"name": "small", "cost_per_query": 1.0, **fields},
                       {"name": "large", "cost_per_query": 5.0, "base_url": "http://127.0.0.1:9/v1"}]}


def test_pool_backend_fields_round_trip():
    data = pool(base_url="https://api.example.com/v1", model="gpt-4o-mini", api_key_env="EXAMPLE_KEY", timeout=12.5)
    loaded = ModelPool.from_dict(data)
    assert loaded.to_dict() == data
    assert ModelPool.from_dict(loaded.to_dict()) == loaded
    small = loaded["small"]
    assert small.served_model == "gpt-4o-mini" and loaded["large"].served_model == "large"
    specs = {s.name: s for s in specs_from_pool(loaded)}
    assert specs["small"].timeout == 12.5 and specs["large"].timeout == 60.0 and specs["small"].model == "gpt-4o-mini"


def test_pools_without_backend_fields_still_load():
    plain = ModelPool.from_dict({"models": [{"name": "a", "cost_per_query": 1}, {"name": "b", "cost_per_query": 2}]})
    assert plain.to_dict() == {"models": [{"name": "a", "cost_per_query": 1}, {"name": "b", "cost_per_query": 2}]}
    with pytest.raises(ValueError, match=r"pool models \['a', 'b'\] have no base_url"):
        specs_from_pool(plain)


@pytest.mark.parametrize("fields, needle", [
    ({"base_url": "127.0.0.1:8080"}, "http:// or https:// URL"),
    ({"base_url": "http://x/v1", "timeout": 0}, "positive number of seconds"),
    ({"base_url": "http://x/v1", "timeout": True}, "positive number of seconds"),
    ({"base_url": "http://x/v1", "api_key_env": "sk-abc123-literal-key"}, "must name an environment variable"),
    ({"base_url": "http://x/v1", "model": ""}, "non-empty string"),
    ({"model": "gpt-4o"}, "give base_url too"),
    ({"base_url": "http://x/v1", "api_key": "sk-1"}, "unknown keys ['api_key']"),
])
def test_pool_backend_fields_are_validated(fields, needle):
    with pytest.raises(ValueError) as info:
        ModelPool.from_dict(pool(**fields))
    assert needle in str(info.value)


# -- serve's refusals -----------------------------------------------------------------

def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("::")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "token")
    check_exposure("0.0.0.0", None, allow_unauthenticated=True)
    with pytest.raises(ValueError, match="without authentication"):
        check_exposure("0.0.0.0", None)


def test_serve_refuses_a_public_host_without_auth(tmp_path, capsys):
    pool_file = tmp_path / "pool.json"
    pool_file.write_text('{"models": []}')
    assert main(["serve", "--router", str(tmp_path), "--pool", str(pool_file), "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on '0.0.0.0' without authentication" in capsys.readouterr().err


def test_serve_refuses_an_unset_api_key_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DR_TEST_UNSET_KEY", raising=False)
    assert main(["serve", "--router", str(tmp_path), "--pool", "p.json", "--api-key-env", "DR_TEST_UNSET_KEY"]) == 2
    assert "DR_TEST_UNSET_KEY: that environment variable is not set" in capsys.readouterr().err


def test_serve_refuses_a_pool_without_base_urls(tmp_path, capsys):
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text("models:\n  - {name: small, cost_per_query: 1}\n  - {name: large, cost_per_query: 2, "
                         "base_url: 'http://127.0.0.1:9/v1'}\n")
    assert main(["serve", "--router", str(tmp_path), "--pool", str(pool_file)]) == 2
    assert "pool models ['small'] have no base_url" in capsys.readouterr().err


# -- request validation and metrics text ----------------------------------------------

def test_validation_accepts_tool_calls_and_content_parts():
    body = {"model": "router", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                               "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"}], "n": 2, "stop": ["\n"], "logprobs": True}
    assert validate_chat_request(body) is body
    with pytest.raises(ApiError) as info:
        validate_chat_request({"model": "router", "messages": [{"role": "assistant", "content": None}]})
    assert info.value.status == 400 and info.value.param == "messages[0].content"


def test_metrics_render_prometheus_text():
    """The exposition is prometheus_client's; the names, labels and counts are ours."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServerMetrics()
    metrics.requests.inc("router", 'we"ird')
    metrics.routing_latency.observe(0.003)
    metrics.routing_latency.observe(0.2)
    metrics.observe_batch(5, 0.01)
    metrics.shed.inc("router", "queue_full")
    metrics.ood_escalations.inc("router", "big")
    metrics.track_queue("router", lambda: 7)
    text = metrics.render()
    assert 'difficulty_router_requests_total{model="we\\"ird",requested="router"} 1.0' in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("difficulty_router_requests_total", (("model", 'we"ird'), ("requested", "router")))] == 1
    assert samples[("difficulty_router_routing_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("difficulty_router_routing_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("difficulty_router_routing_latency_seconds_count", ())] == 2
    assert samples[("difficulty_router_batch_size_bucket", (("le", "4.0"),))] == 0
    assert samples[("difficulty_router_batch_size_bucket", (("le", "8.0"),))] == 1
    assert samples[("difficulty_router_shed_requests_total", (("reason", "queue_full"), ("router", "router")))] == 1
    assert samples[("difficulty_router_ood_escalations_total", (("model", "big"), ("router", "router")))] == 1
    assert samples[("difficulty_router_queue_depth", (("router", "router"),))] == 7
    assert metrics.requests.get("router", 'we"ird') == 1 and metrics.routing_latency.count == 2
    assert ServerMetrics().requests.get("router", 'we"ird') == 0  # each instance counts on its own
