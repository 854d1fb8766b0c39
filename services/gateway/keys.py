"""API keys: issued once in plaintext, stored only as SHA-256 digests, each mapped to a tenant.

Keys carry 192 bits of randomness, so a fast digest is the right storage (as for GitHub or
Stripe tokens); a slow password hash would only add latency to every cache miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common import errors
from services.gateway.settings import TenantLimits

KEY_PREFIX = "mlm"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL,
    tenant TEXT NOT NULL,
    requests_per_s REAL NOT NULL,
    burst INTEGER NOT NULL,
    tokens_per_min INTEGER NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_id: str
    limits: TenantLimits


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    tenant: str
    limits: TenantLimits
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: str
    api_key: str  # shown once, never stored
    tenant: str


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def parse_key_id(api_key: str) -> str | None:
    parts = api_key.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12:
        return None
    return parts[1]


class KeyStore:
    """SQLite-backed key table. Blocking: call it from a thread when inside a coroutine."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._connect() as db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def create(self, tenant: str, limits: TenantLimits) -> IssuedKey:
        if not tenant or not tenant.replace("-", "").replace("_", "").isalnum():
            raise errors.InvalidArgument("tenant: use letters, digits, '-' and '_' only")
        key_id = secrets.token_hex(6)
        api_key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(24).replace('_', 'x')}"
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    key_id,
                    digest(api_key),
                    tenant,
                    limits.requests_per_s,
                    limits.burst,
                    limits.tokens_per_min,
                    time.time(),
                ),
            )
        return IssuedKey(key_id, api_key, tenant)

    def lookup(self, api_key: str) -> Tenant | None:
        key_id = parse_key_id(api_key)
        if key_id is None:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT key_sha256, tenant, requests_per_s, burst, tokens_per_min FROM api_keys "
                "WHERE key_id = ? AND revoked_at IS NULL",
                (key_id,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[0], digest(api_key)):
            return None
        return Tenant(row[1], key_id, TenantLimits(requests_per_s=row[2], burst=row[3], tokens_per_min=row[4]))

    def revoke(self, key_id: str) -> bool:
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return cursor.rowcount == 1

    def list(self) -> list[KeyRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT key_id, tenant, requests_per_s, burst, tokens_per_min, created_at, revoked_at "
                "FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [
            KeyRecord(r[0], r[1], TenantLimits(requests_per_s=r[2], burst=r[3], tokens_per_min=r[4]), r[5], r[6])
            for r in rows
        ]


class Authenticator:
    """Resolves keys to tenants with a TTL cache in front of the store (revocation within TTL)."""

    def __init__(self, store: KeyStore, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[Tenant | None, float]] = {}
        self._max_entries = 10_000

    async def authenticate(self, api_key: str | None) -> Tenant:
        if not api_key:
            raise errors.Unauthenticated(
                "missing API key: send metadata 'authorization: Bearer <key>' (create one with `mlmesh keys create`)"
            )
        now = self._clock()
        hit = self._cache.get(api_key)
        if hit is not None and hit[1] > now:
            tenant = hit[0]
        else:
            tenant = await asyncio.to_thread(self.store.lookup, api_key)
            if len(self._cache) >= self._max_entries:
                self._cache.clear()  # bounded memory under a flood of random keys
            # Unknown keys are cached briefly so a flood of bad keys cannot hammer the store.
            self._cache[api_key] = (tenant, now + (self.ttl_s if tenant else min(self.ttl_s, 2.0)))
        if tenant is None:
            raise errors.Unauthenticated("invalid or revoked API key")
        return tenant
