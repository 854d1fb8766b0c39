import sqlite3
from pathlib import Path

import pytest

from services.common import errors
from services.gateway.keys import Authenticator, KeyStore, digest
from services.gateway.settings import TenantLimits


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.db")


def test_keys_are_stored_only_as_digests(store: KeyStore) -> None:
    issued = store.create("acme", TenantLimits())
    dump = "\n".join(sqlite3.connect(store.path).iterdump())
    assert issued.api_key not in dump
    assert digest(issued.api_key) in dump


def test_lookup_maps_key_to_tenant_with_its_limits(store: KeyStore) -> None:
    issued = store.create("acme", TenantLimits(requests_per_s=5, burst=7, tokens_per_min=99))
    tenant = store.lookup(issued.api_key)
    assert tenant is not None
    assert (tenant.name, tenant.limits.burst, tenant.limits.tokens_per_min) == ("acme", 7, 99)


def test_wrong_malformed_and_revoked_keys_are_refused(store: KeyStore) -> None:
    issued = store.create("acme", TenantLimits())
    assert store.lookup(issued.api_key[:-1] + ("A" if issued.api_key[-1] != "A" else "B")) is None
    assert store.lookup("not-a-key") is None
    assert store.lookup("") is None
    assert store.revoke(issued.key_id)
    assert store.lookup(issued.api_key) is None
    assert not store.revoke(issued.key_id)


def test_tenant_names_are_validated(store: KeyStore) -> None:
    with pytest.raises(errors.InvalidArgument, match="tenant"):
        store.create("bad tenant;drop", TenantLimits())


async def test_authenticator_caches_and_honours_revocation_after_ttl(store: KeyStore) -> None:
    now = [0.0]
    auth = Authenticator(store, ttl_s=30, clock=lambda: now[0])
    issued = store.create("acme", TenantLimits())
    assert (await auth.authenticate(issued.api_key)).name == "acme"
    store.revoke(issued.key_id)
    assert (await auth.authenticate(issued.api_key)).name == "acme"  # cached within TTL
    now[0] = 31
    with pytest.raises(errors.Unauthenticated, match="invalid or revoked"):
        await auth.authenticate(issued.api_key)


async def test_missing_key_says_how_to_authenticate(store: KeyStore) -> None:
    with pytest.raises(errors.Unauthenticated, match="authorization: Bearer"):
        await Authenticator(store).authenticate(None)
