import pytest

from services.common import errors
from services.gateway.keys import Tenant
from services.gateway.ratelimit import TenantRateLimiter, TokenBucket
from services.gateway.settings import TenantLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tenant(rps: float = 10, burst: int = 5, tpm: int = 600, name: str = "acme") -> Tenant:
    return Tenant(name, "k1", TenantLimits(requests_per_s=rps, burst=burst, tokens_per_min=tpm))


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    bucket = TokenBucket(rate_per_s=2, capacity=3, now=0)
    assert [bucket.try_take(1, 0) for _ in range(3)] == [0, 0, 0]
    assert bucket.try_take(1, 0) == pytest.approx(0.5)
    assert bucket.try_take(1, 0.5) == 0
    assert bucket.try_take(1, 100) == 0  # refill is capped at capacity
    assert bucket.level == pytest.approx(2)


def test_requests_beyond_burst_get_resource_exhausted_with_retry_hint() -> None:
    clock = FakeClock()
    limiter = TenantRateLimiter(clock)
    t = tenant(rps=10, burst=5)
    for _ in range(5):
        limiter.admit_request(t)
    with pytest.raises(errors.ResourceExhausted, match="10 requests/s") as info:
        limiter.admit_request(t)
    assert info.value.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1
    limiter.admit_request(t)


def test_tenants_are_isolated() -> None:
    limiter = TenantRateLimiter(FakeClock())
    noisy, quiet = tenant(burst=1, name="noisy"), tenant(burst=1, name="quiet")
    limiter.admit_request(noisy)
    with pytest.raises(errors.ResourceExhausted):
        limiter.admit_request(noisy)
    limiter.admit_request(quiet)


def test_token_budget_goes_into_debt_and_blocks_until_repaid() -> None:
    clock = FakeClock()
    limiter = TenantRateLimiter(clock)
    t = tenant(tpm=600)  # 10 tokens/s
    limiter.admit_generation(t)
    limiter.charge_tokens(t, 650)  # a long generation overshoots the budget by 50
    with pytest.raises(errors.ResourceExhausted, match="600 tokens/min") as info:
        limiter.admit_generation(t)
    assert info.value.retry_after_s == pytest.approx(5.1)
    clock.now += 5.1
    limiter.admit_generation(t)


def test_changed_limits_take_effect() -> None:
    limiter = TenantRateLimiter(FakeClock())
    limiter.admit_request(tenant(burst=1))
    with pytest.raises(errors.ResourceExhausted):
        limiter.admit_request(tenant(burst=1))
    limiter.admit_request(tenant(burst=10))
