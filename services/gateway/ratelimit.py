"""Per-tenant token buckets: requests per second, and LLM tokens per minute."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.common import errors
from services.gateway.keys import Tenant
from services.gateway.settings import TenantLimits

_EPSILON = 1e-9  # absorbs float error so "retry after X s" is exact when honoured


class TokenBucket:
    """Refills continuously at `rate_per_s` up to `capacity`. May go into debt when charged after
    the fact (tokens are known only once generated); a bucket in debt admits nothing."""

    __slots__ = ("capacity", "level", "rate_per_s", "updated")

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
            self.updated = now

    def try_take(self, cost: float, now: float) -> float:
        """Takes `cost` if available and returns 0; otherwise returns seconds until it would be."""
        self._refill(now)
        if self.level >= cost - _EPSILON:
            self.level -= cost
            return 0.0
        return (cost - self.level) / self.rate_per_s

    def seconds_until(self, cost: float, now: float) -> float:
        """Seconds until `cost` could be taken (0 if now), without taking it."""
        self._refill(now)
        missing = cost - self.level
        return missing / self.rate_per_s if missing > _EPSILON else 0.0

    def charge(self, cost: float, now: float) -> None:
        self._refill(now)
        self.level -= cost


class TenantRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, tuple[TenantLimits, TokenBucket]] = {}
        self._tokens: dict[str, tuple[TenantLimits, TokenBucket]] = {}

    def _bucket(
        self, table: dict[str, tuple[TenantLimits, TokenBucket]], tenant: Tenant, rate: float, capacity: float
    ) -> TokenBucket:
        entry = table.get(tenant.name)
        # Limits changed: start a fresh bucket. Identity first: the authenticator hands out the
        # same limits object while its cache holds the key, and pydantic's == is not free.
        if entry is None or (entry[0] is not tenant.limits and entry[0] != tenant.limits):
            entry = (tenant.limits, TokenBucket(rate, capacity, self._clock()))
            table[tenant.name] = entry
        return entry[1]

    def admit_request(self, tenant: Tenant) -> None:
        limits = tenant.limits
        bucket = self._bucket(self._requests, tenant, limits.requests_per_s, limits.burst)
        wait = bucket.try_take(1, self._clock())
        if wait:
            raise errors.ResourceExhausted(
                f"rate limit for tenant '{tenant.name}' ({limits.requests_per_s:g} requests/s) exceeded; "
                f"retry after {wait:.3f}s",
                retry_after_s=wait,
            )

    def admit_generation(self, tenant: Tenant) -> None:
        """Admits while the tenant's token budget is positive; usage is charged as it happens."""
        limits = tenant.limits
        bucket = self._bucket(self._tokens, tenant, limits.tokens_per_min / 60.0, limits.tokens_per_min)
        wait = bucket.seconds_until(1, self._clock())
        if wait:
            raise errors.ResourceExhausted(
                f"token budget for tenant '{tenant.name}' ({limits.tokens_per_min} tokens/min) exhausted; "
                f"retry after {wait:.3f}s",
                retry_after_s=wait,
            )

    def charge_tokens(self, tenant: Tenant, tokens: int) -> None:
        limits = tenant.limits
        bucket = self._bucket(self._tokens, tenant, limits.tokens_per_min / 60.0, limits.tokens_per_min)
        bucket.charge(tokens, self._clock())
