"""Scale-out on Ray (the optional ``ray`` extra): distributed extraction into Parquet shards, training from
shards (in memory or streamed), distributed labelling (``ray_label``), and a Ray Serve deployment of the
routing server.

``shards`` needs only pyarrow; the Ray parts import Ray when called, so ``import difficulty_router.scale``
works without the extra and a missing one is reported by :func:`require_ray` with the install command.
"""

from __future__ import annotations

import os

INSTALL_HINT = "pip install 'difficulty-router[ray]'"


def require_ray():
    """Import Ray, or say how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"the Ray engine needs its extra (ray is missing): {INSTALL_HINT}") from None
    return ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster at ``address`` (``"auto"``: one started with ``ray start``), or start a local one
    on loopback when none is given and none is running. Usage stats and the dashboard stay off: the local
    cluster is a worker pool, not a service."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray
