"""The registry's versions, stages, aliases and audit chain on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from services.common import errors
from services.common.settings import REPO_ROOT
from services.registry.artifacts import LocalArtifactStore, read_directory
from services.registry.core import Registry
from services.registry.deployer import TritonDeployer
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore

POSTGRES_ADMIN_DSN = os.environ.get("MLMESH_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
TABULAR_DIR = REPO_ROOT / "model_repository" / "tabular_classifier"


def _postgres_database() -> tuple[str, str]:
    name = f"mlmesh_registry_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {POSTGRES_ADMIN_DSN} (scripts/ensure-postgres.sh starts it): {exc}")
    return name, POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"


def _drop_database(name: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
async def registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Registry]:
    dropped = None
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        dropped, dsn = _postgres_database()
    settings = RegistrySettings(database_url=dsn, artifact_dir=str(tmp_path / "artifacts"), triton_url="127.0.0.1:1")
    store = RegistryStore(dsn)
    registry = Registry(settings, store, LocalArtifactStore(tmp_path / "artifacts"), TritonDeployer("127.0.0.1:1"))
    yield registry
    await registry.deployer.close()
    store.close()
    if dropped:
        _drop_database(dropped)


async def test_versions_aliases_and_stages(registry: Registry) -> None:
    files = read_directory(TABULAR_DIR)
    first = await registry.register("alice", "clf", "tabular", files, "first", {"code_commit": "abc123"})
    second = await registry.register("bob", "clf", "", files, "same bytes")
    assert (first.version, second.version) == (1, 2)
    assert first.artifact_sha256 == second.artifact_sha256  # content-addressed
    assert first.stage == "development"

    with pytest.raises(errors.InvalidArgument, match="kind: model 'new' is new"):
        await registry.register("bob", "new", "", files)
    with pytest.raises(errors.InvalidArgument, match="kind: model 'clf' is tabular, not llm"):
        await registry.register("bob", "clf", "llm", files)

    staged = await registry.transition("alice", "clf", "1", "staging", "ready for review")
    assert staged.stage == "staging"
    with pytest.raises(errors.FailedPrecondition, match="cannot move from development to canary"):
        await registry.transition("alice", "clf", "2", "canary", "skip")
    with pytest.raises(errors.NotFound, match="no version 9"):
        await registry.transition("alice", "clf", "9", "staging", "")

    await registry.set_alias("alice", "clf", "1", "champion", "best so far")
    assert (await registry.resolve("clf", "champion")).version == 1
    await registry.set_alias("alice", "clf", "2", "champion", "moved")
    assert (await registry.resolve("clf", "champion")).version == 2
    card = await registry.card(await registry.resolve("clf", "1"))
    assert "abc123" in card and "staging" in card and first.artifact_sha256 in card


async def test_audit_chain_holds_under_concurrent_writers_and_detects_tampering(registry: Registry) -> None:
    await asyncio.gather(*(registry.audit(f"user{i}", "note", "clf", f"entry {i}") for i in range(20)))
    verdict = await registry.verify_audit()
    assert verdict.ok and verdict.entries == 20

    with registry.store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_log SET actor = 'mallory' WHERE seq = 7")
    verdict = await registry.verify_audit()
    assert not verdict.ok and verdict.first_bad_seq == 7
