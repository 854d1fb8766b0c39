"""A per-target circuit breaker: closed -> open (cooldown) -> half-open (probes) -> closed.

It opens after `failure_threshold` consecutive failures, or when at least `min_calls` of the last
`window` calls were recorded and the share of failures among them reaches `failure_rate`. While
open, allow() says no and the router sends the target's requests straight to the stable target.
After `cooldown_s` it lets `half_open_probes` calls through: a success closes it, a failure opens
it for another cooldown. Plain attributes, no locks: it lives on one asyncio event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5  # consecutive failures that open it (0 = off)
    failure_rate: float = 0.5  # failure share over the window that opens it (0 = off)
    window: int = 20  # how many recent calls the failure rate looks at
    min_calls: int = 10  # calls in the window before the rate is judged
    cooldown_s: float = 5.0  # how long it stays open before probing
    half_open_probes: int = 1  # calls let through at once while half-open


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_outcomes",
        "_position",
        "_probes",
        "_probes_since",
        "_recorded",
        "config",
        "consecutive_failures",
        "opened_at",
        "opens",
        "state",
        "window_failures",
    )

    def __init__(self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.opens = 0  # how many times it opened (for counters and tests)
        self._outcomes = [False] * max(self.config.window, 1)  # ring of recent calls: True = failed
        self._position = 0
        self._recorded = 0
        self.window_failures = 0
        self._probes = 0
        self._probes_since = 0.0

    def allow(self) -> bool:
        """May a call go to this target now? (Half-open: counts as taking a probe slot.)"""
        if self.state == CLOSED:
            return True
        now = self._clock()
        if self.state == OPEN:
            if now - self.opened_at < self.config.cooldown_s:
                return False
            self.state = HALF_OPEN
            self._probes = 0
        # Half-open. A probe whose outcome never came back (its caller vanished) frees its slot
        # after a cooldown, so the breaker cannot stay half-open forever.
        if self._probes >= self.config.half_open_probes and now - self._probes_since < self.config.cooldown_s:
            return False
        if self._probes >= self.config.half_open_probes:
            self._probes = 0
        self._probes += 1
        self._probes_since = now
        return True

    def record_success(self) -> None:
        if self.state == CLOSED:
            self.consecutive_failures = 0
            self._push(False)
        elif self.state == HALF_OPEN:
            self._close()
        # Open: a call that started before it opened proves little; the cooldown runs its course.

    def record_failure(self) -> None:
        if self.state == HALF_OPEN:
            self._open()
            return
        if self.state == OPEN:
            return  # a late failure of a call that started before it opened
        self.consecutive_failures += 1
        self._push(True)
        config = self.config
        if config.failure_threshold > 0 and self.consecutive_failures >= config.failure_threshold:
            self._open()
        elif (
            config.failure_rate > 0
            and self._recorded >= config.min_calls
            and self.window_failures >= config.failure_rate * self._recorded
        ):
            self._open()

    def release(self) -> None:
        """A call that proved nothing either way (cancelled, bad request, deadline): frees its probe."""
        if self.state == HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _push(self, failed: bool) -> None:
        outcomes = self._outcomes
        position = self._position
        if self._recorded == len(outcomes):
            if outcomes[position]:
                self.window_failures -= 1
        else:
            self._recorded += 1
        outcomes[position] = failed
        if failed:
            self.window_failures += 1
        self._position = (position + 1) % len(outcomes)

    def _open(self) -> None:
        self.opens += 1
        self.state = OPEN
        self.opened_at = self._clock()
        self._probes = 0

    def _close(self) -> None:
        self.state = CLOSED
        self.consecutive_failures = 0
        self._probes = 0
        self._outcomes = [False] * len(self._outcomes)
        self._position = 0
        self._recorded = 0
        self.window_failures = 0
