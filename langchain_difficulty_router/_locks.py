"""One lock per router: the extractor captures hidden states with forward hooks registered on
the shared model, so two extractions running at once in different threads would read each
other's activations. ``batch`` runs calls in a thread pool, hence the lock."""

from __future__ import annotations

import threading
import weakref

_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_guard = threading.Lock()


def router_lock(router) -> threading.Lock:
    with _guard:
        lock = _locks.get(router)
        if lock is None:
            lock = _locks[router] = threading.Lock()
        return lock
