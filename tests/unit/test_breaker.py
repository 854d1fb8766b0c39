"""Circuit breaker: consecutive failures, failure rate, cooldown, half-open probing."""

from __future__ import annotations

from services.router.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **config: float) -> CircuitBreaker:
    defaults = {"failure_threshold": 3, "failure_rate": 0.0, "window": 10, "min_calls": 5, "cooldown_s": 5.0}
    return CircuitBreaker(BreakerConfig(**{**defaults, **config}), clock)  # type: ignore[arg-type]


def test_opens_after_consecutive_failures_and_success_resets_the_run() -> None:
    b = breaker(Clock())
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state == CLOSED and b.allow()
    b.record_failure()
    assert b.state == OPEN and b.opens == 1
    assert not b.allow()


def test_opens_on_failure_rate_over_the_window_once_enough_calls() -> None:
    b = breaker(Clock(), failure_threshold=0, failure_rate=0.5, window=10, min_calls=6)
    for _ in range(2):
        b.record_failure()
        b.record_success()
    assert b.state == CLOSED  # 2 of 4: not enough calls yet
    b.record_success()
    assert b.state == CLOSED  # 2 of 5
    b.record_failure()
    assert b.state == OPEN  # 3 of 6 = 50%


def test_old_outcomes_leave_the_window() -> None:
    b = breaker(Clock(), failure_threshold=0, failure_rate=0.5, window=4, min_calls=4)
    b.record_failure()
    for _ in range(3):
        b.record_success()
    assert b.window_failures == 1
    for _ in range(4):
        b.record_success()
    assert b.window_failures == 0
    b.record_failure()
    assert b.state == CLOSED  # 1 of 4
    b.record_failure()
    assert b.state == OPEN  # 2 of 4


def test_cooldown_then_one_probe_and_a_success_closes() -> None:
    clock = Clock()
    b = breaker(clock, cooldown_s=5.0)
    for _ in range(3):
        b.record_failure()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()  # the probe
    assert b.state == HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state == CLOSED
    assert all(b.allow() for _ in range(10))
    # Closed again with a clean slate: it takes a full run of failures to reopen.
    b.record_failure()
    b.record_failure()
    assert b.state == CLOSED


def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    b = breaker(clock, cooldown_s=5.0)
    for _ in range(3):
        b.record_failure()
    clock.now += 5.0
    assert b.allow()
    b.record_failure()
    assert b.state == OPEN and b.opens == 2
    clock.now += 4.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()


def test_released_probe_frees_its_slot() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 5.0
    assert b.allow()
    b.release()  # e.g. the caller's deadline passed: says nothing about the target
    assert b.state == HALF_OPEN
    assert b.allow()


def test_lost_probe_does_not_wedge_half_open() -> None:
    clock = Clock()
    b = breaker(clock, cooldown_s=2.0)
    for _ in range(3):
        b.record_failure()
    clock.now += 2.0
    assert b.allow()
    assert not b.allow()
    clock.now += 2.0  # the probe never reported back
    assert b.allow()


def test_late_outcomes_while_open_change_nothing() -> None:
    clock = Clock()
    b = breaker(clock, cooldown_s=5.0)
    for _ in range(3):
        b.record_failure()
    opened_at = b.opened_at
    clock.now += 1.0
    b.record_success()  # a call that started before it opened
    b.record_failure()
    assert b.state == OPEN and b.opened_at == opened_at and b.opens == 1


def test_several_half_open_probes() -> None:
    clock = Clock()
    b = breaker(clock, half_open_probes=3)
    for _ in range(3):
        b.record_failure()
    clock.now += 5.0
    assert [b.allow() for _ in range(4)] == [True, True, True, False]


def test_disabled_triggers_never_open() -> None:
    b = breaker(Clock(), failure_threshold=0, failure_rate=0.0)
    for _ in range(100):
        b.record_failure()
    assert b.state == CLOSED and b.allow()
