"""When the live server re-warms its core before a tick, and how long it may sleep until then.

Why: a core that slept for most of a period decodes its next window slower than one that never
stopped (poyo-1.3M, one thread, this CPU: 19 ms after a 40 ms sleep against 9 ms back to back,
bench/idle_forward.py; served on a quiet machine, p99 14.0 ms warm against 17.2 ms; bench/RESULTS.md,
"Live decoding"): the weights have left the caches and the core has clocked down. So shortly before each tick the server runs the model once on the newest window, throws the
output away, and then polls its inlet without sleeping until the tick. The real decode then finds
the weights in cache and the core awake. It costs about one more forward a tick of CPU; a model too
slow for it (a forward over a third of the period) is left alone, since a prime would eat the time
the tick needs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Warmth:
    period_s: float
    enabled: bool = True
    first_s: float = 0.0  # a forward's seconds before any tick was decoded (the start-up probe's)
    recent: deque = field(default_factory=lambda: deque(maxlen=32))  # seconds of the latest decodes
    primed: bool = False  # the next tick's prime has run

    def __post_init__(self) -> None:
        self._lead = self._lead_from(self.first_s)

    def _lead_from(self, typical: float) -> float:
        """Seconds before a tick to prime: twice a typical forward (the prime, then the polling that
        keeps the core awake) plus a millisecond; 0 when off or when the model is too slow for it."""
        if not self.enabled or typical > self.period_s / 3:
            return 0.0
        return min(2 * typical + 0.001, 0.6 * self.period_s)

    def lead_s(self) -> float:
        """The current lead (it changes only when a tick is decoded, not on every poll of the inlet)."""
        return self._lead

    def prime_now(self, now: float, due: float) -> bool:
        """Whether to run the throw-away forward now (once per tick, inside the lead, before the tick)."""
        lead = self._lead
        if lead and not self.primed and due - lead <= now < due:
            self.primed = True
            return True
        return False

    def wait_s(self, now: float, due: float) -> float:
        """How long the inlet may block: until the prime (or the tick), at most 50 ms; 0 (poll) once primed."""
        lead = self._lead
        if lead and self.primed:
            return 0.0
        return max(0.0, min(due - lead - now, 0.05))

    def decoded(self, seconds: float) -> None:
        """A tick was decoded in `seconds` (tokenize + forward): the next tick gets its own prime."""
        self.recent.append(seconds)
        self._lead = self._lead_from(sorted(self.recent)[len(self.recent) // 2])
        self.primed = False
