"""Scale-out on Ray (the optional ``ray`` extra): distributed extraction into Parquet shards, training from
shards (in memory or streamed), distributed labelling (``ray_label``), and a Ray Serve deployment of the
routing server.

``shards`` needs only pyarrow; the Ray parts import Ray when called, so ``import difficulty_router.scale``
works without the extra and a missing one is reported by :func:`.cluster.require_ray` with the install command.

Nothing here waits forever for the cluster (:mod:`.cluster`). ``ensure_ray`` retries a local start that fails (a loaded
machine can keep Ray's processes from starting in Ray's own time limits) and then says what to try; the
jobs wait for their workers to be placed for at most ``worker_start_timeout_s``
(``DEFAULT_WORKER_START_TIMEOUT_S``) and raise ``WorkersNotPlacedError`` naming what was asked and
what the cluster has, instead of queueing behind CPUs that never come free.
"""
