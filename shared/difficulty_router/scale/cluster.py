"""Connecting to or starting a Ray cluster, and placing a job's workers on it within a stated time.

Shared by every Ray job here (extraction, labelling, serve): a local start that fails on a loaded machine
is retried and then explained; workers that cannot be placed raise :class:`WorkersNotPlacedError` naming
what was asked and what the cluster has, instead of queueing forever.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

INSTALL_HINT = "pip install 'difficulty-router[ray]'"
#: how long a job waits for its workers (labelling actors, the extraction actor pool) to be placed and started
DEFAULT_WORKER_START_TIMEOUT_S = 60.0
#: tries at starting a local cluster, and the wait before the second (doubled before each later one)
START_ATTEMPTS = 3
START_BACKOFF_S = 2.0

log = logging.getLogger(__name__)


class WorkersNotPlacedError(TimeoutError):
    """A job's workers did not all start within its timeout: the cluster lacks free CPUs (or GPUs) for them.
    A ``TimeoutError``, so an ``OSError``: the CLI prints it as one line."""


class RayStartError(OSError):
    """Ray could not be started (or connected to); the message says what failed and what to try."""


def require_ray():
    """Import Ray, or say how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"the Ray engine needs its extra (ray is missing): {INSTALL_HINT}") from None
    return ray


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    attempts: int = START_ATTEMPTS,
    backoff_s: float = START_BACKOFF_S,
):
    """Connect to the cluster at ``address`` (``"auto"``: one started with ``ray start``), or start a local one
    on loopback when none is given and none is running. Usage stats and the dashboard stay off: the local
    cluster is a worker pool, not a service.

    Starting a local cluster is tried ``attempts`` times, ``backoff_s`` then twice that (and so on) apart: on
    a loaded machine Ray's GCS or raylet can miss Ray's own start-up limits (the raylet has 30 s to register).
    What a failed try left running is stopped before the next. Errors that another try cannot fix (bad
    arguments) are raised at once, and so is a failure to connect to ``address`` (a wrong address stays
    wrong); either way the :class:`RayStartError` says what failed and what to try."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if attempts < 1 or backoff_s < 0:
        raise ValueError(f"attempts must be >= 1 and backoff_s >= 0, got {attempts} and {backoff_s}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ValueError, TypeError):
            raise
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError or plain Exception
            _stop_half_started(ray, set())
            raise RayStartError(
                f"could not connect to the Ray cluster at {address!r} ({type(exc).__name__}: {_first_line(exc)}); "
                "check the address and that `ray status` on the head node shows the cluster up, or leave out "
                "--ray-address to start a local cluster"
            ) from exc
        return ray
    waits: list[float] = []
    for attempt in range(1, attempts + 1):
        before = _ray_children()
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
            return ray
        except (ValueError, TypeError):  # bad arguments: the same on every try
            _stop_half_started(ray, before)
            raise
        except Exception as exc:  # noqa: BLE001 -- Ray raises RuntimeError, ConnectionError or plain Exception
            _stop_half_started(ray, before)
            last = exc
            if attempt < attempts:
                wait = backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "starting Ray failed (try %d of %d: %s: %s); trying again in %g s",
                    attempt,
                    attempts,
                    type(exc).__name__,
                    _first_line(exc),
                    wait,
                )
                waits.append(wait)
                time.sleep(wait)
    spacing = f", {' and '.join(f'{w:g} s' for w in waits)} apart" if waits else ""
    cpus = f" with {num_cpus} CPUs" if num_cpus else ""
    raise RayStartError(
        f"could not start a local Ray cluster{cpus} in {attempts} tries{spacing}; the last failed with "
        f"{type(last).__name__}: {_first_line(last)}. On a loaded machine Ray's processes (GCS, raylet) can miss "
        "Ray's start-up limits: start the cluster on its own with `ray start --head --num-cpus N` (run it again "
        "until `ray status` answers) and pass --ray-address auto, ask for fewer CPUs, or try again when the machine "
        "is less busy; Ray's logs are under /tmp/ray/session_latest/logs"
    ) from last


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _ray_children() -> set[int]:
    """The ids of this process's children (so a failed start can stop only the ones it started)."""
    try:
        import psutil
    except ImportError:
        return set()
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_half_started(ray, before: set[int]) -> None:
    """Undo a failed ``ray.init``: ``ray.shutdown`` stops what Ray recorded as started; a start that failed
    inside Ray's node set-up recorded nothing, so the processes it did start (GCS, raylet, log monitor,
    reaper), children of this process that run Ray's own programs and were not there before, are stopped
    by their ids."""
    try:
        ray.shutdown()
    except Exception as exc:  # noqa: BLE001 -- best effort: the error that matters is the start's
        log.debug("ray.shutdown after a failed start: %s", exc)
    try:
        import psutil
    except ImportError:
        return
    ray_dir = os.path.dirname(os.path.abspath(ray.__file__))
    left: list = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in before:
            continue
        try:
            if any(arg.startswith(ray_dir) for arg in proc.cmdline()):
                proc.terminate()
                left.append(proc)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)  # and reaped: no zombie left behind


def cluster_cpus(ray) -> tuple[float, float]:
    """The cluster's CPUs: in all, and free now."""
    return float(ray.cluster_resources().get("CPU", 0.0)), float(ray.available_resources().get("CPU", 0.0))


def _amount(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


def not_placed_error(
    ray,
    what: str,
    workers: int,
    running: int | None,
    cpus_per_worker: float,
    timeout_s: float,
    free_before: float,
    *,
    gpus_per_worker: float = 0,
) -> WorkersNotPlacedError:
    """The error for a job whose ``workers`` were not all running after ``timeout_s``: what was asked, what the
    cluster has (``free_before``: its free CPUs when the job asked), and what to do. ``running``: how many
    were, where known (else the workers were reserved as a whole, and not all of them could be)."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    each, in_all = _amount(cpus_per_worker, "CPU"), _amount(workers * cpus_per_worker, "CPU")
    asked = f"{_amount(workers, 'worker')} x {each} each ({in_all}"
    asked += f", and {_amount(gpus_per_worker, 'GPU')} each)" if gpus_per_worker else ")"
    got = f"{running} of them were running" if running is not None else "the cluster could not place them all"
    has = f"the cluster has {_amount(total, 'CPU')} in all, {free_before:g} free when the job asked"
    if gpus_per_worker:
        has += f", and {_amount(float(ray.cluster_resources().get('GPU', 0.0)), 'GPU')}"
    if workers * cpus_per_worker > total:
        cause = "more than it has in all"
    elif workers * cpus_per_worker > free_before:
        cause = "other jobs or actors hold the rest: `ray status` shows them"
    else:
        cause = "enough were free: the workers were slow to start, as on a loaded machine"
    return WorkersNotPlacedError(
        f"{what} asked for {asked} and {got} within {timeout_s:g} s: {has} ({cause}). Ask for fewer workers "
        "(--workers) or fewer CPUs each (--cpus-per-worker), free CPUs on the cluster, or wait longer "
        "(--worker-start-timeout)"
    )


def start_workers(
    ray,
    make: Callable[[], Any],
    workers: int,
    what: str,
    cpus_per_worker: float,
    timeout_s: float,
    *,
    gpus_per_worker: float = 0,
) -> list:
    """Start ``workers`` actors with ``make`` and wait up to ``timeout_s`` for all of them to be placed and
    running (constructor returned); when some are not, kill them all and raise :class:`WorkersNotPlacedError`.
    Returns the actors."""
    _, free_before = cluster_cpus(ray)
    actors = [make() for _ in range(workers)]
    refs = [actor.__ray_ready__.remote() for actor in actors]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=False)
    if not pending:
        return actors
    for actor in actors:
        ray.kill(actor)
    raise not_placed_error(
        ray, what, workers, len(ready), cpus_per_worker, timeout_s, free_before, gpus_per_worker=gpus_per_worker
    )


def reserve_workers(
    ray,
    workers: int,
    what: str,
    cpus_per_worker: float,
    timeout_s: float,
    *,
    gpus_per_worker: float = 0,
):
    """Reserve ``workers`` workers' resources (``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs each) as a
    placement group of one bundle per worker, waiting at most ``timeout_s``; returns the ready group (remove it
    with ``ray.util.remove_placement_group``, which also stops what runs in it). When the cluster cannot
    reserve them in time the group is removed and :class:`WorkersNotPlacedError` raised. For jobs whose
    workers Ray starts itself (a Ray Data actor pool): scheduled into the group, they are sure of their place,
    and removing the group stops them whatever happened to the job."""
    from ray.util.placement_group import placement_group, remove_placement_group

    _, free_before = cluster_cpus(ray)
    bundle = {"CPU": float(cpus_per_worker), **({"GPU": float(gpus_per_worker)} if gpus_per_worker else {})}
    group = placement_group([dict(bundle) for _ in range(workers)], strategy="SPREAD")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if ready:
        return group
    remove_placement_group(group)
    raise not_placed_error(
        ray, what, workers, None, cpus_per_worker, timeout_s, free_before, gpus_per_worker=gpus_per_worker
    )


def check_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"the worker start timeout must be a positive number of seconds, got {timeout_s}")
    return float(timeout_s)
