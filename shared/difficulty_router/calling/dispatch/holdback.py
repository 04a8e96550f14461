"""When a routed stream commits to the model streaming it: at its first chunk, or after a hold-back.

Once a chunk reaches the caller, another model cannot take the stream over without the caller
seeing two answers spliced together, so a backend that breaks after its first chunk used to be
the caller's error. Holding back the first ``chunks`` chunks, or the first ``ms`` milliseconds of
a stream, moves that point: a stream that breaks while held back escalates like any failed call
(the caller sees one clean stream from the model that succeeded), at the price of that much
added latency before the first chunk shows. It is off by default (commit at the first chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamHoldback:
    """Hold a stream's chunks back until ``chunks`` have arrived or ``ms`` milliseconds have passed
    since its first chunk, whichever comes first (0 turns a bound off; both 0: commit at the first
    chunk). The time bound is read as chunks arrive: the chunk that arrives ``ms`` or more after the
    first commits the stream, with every chunk held before it. A stream that ends while held back
    is committed whole."""

    chunks: int = 0
    ms: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 0:
            raise ValueError(f"stream hold-back chunks must be an integer >= 0, got {self.chunks!r}")
        if (
            isinstance(self.ms, bool)
            or not isinstance(self.ms, (int, float))
            or not (math.isfinite(self.ms) and self.ms >= 0)
        ):
            raise ValueError(f"stream hold-back ms must be a finite number of milliseconds >= 0, got {self.ms!r}")

    @property
    def on(self) -> bool:
        return self.chunks > 0 or self.ms > 0

    def commits(self, held: int, since_first_s: float) -> bool:
        """Is a stream that has ``held`` chunks, the first of them ``since_first_s`` seconds ago, committed now?"""
        if not self.on:
            return held >= 1
        return (self.chunks > 0 and held >= self.chunks) or (self.ms > 0 and 1000 * since_first_s >= self.ms)

    def describe(self) -> str:
        if not self.on:
            return "off (a stream commits at its first chunk)"
        bounds = [f"{self.chunks} chunks" if self.chunks else "", f"{self.ms:g} ms" if self.ms else ""]
        return "held back until " + " or ".join(b for b in bounds if b)


NO_HOLDBACK = StreamHoldback()
