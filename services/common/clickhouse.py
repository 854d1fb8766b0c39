"""The one ClickHouse client factory: embedded chdb or a ClickHouse server, chosen by DSN.

    chdb:///abs/path     embedded engine, data in that directory (one process per directory)
    chdb://memory        embedded engine, in memory (tests)
    http(s)://[user:password@]host:8123[/database]   a ClickHouse server

clickhouse-connect drives both, so the code using the client is the same. chdb locks its data
directory to one process and allows one directory per process: with embedded ClickHouse every
service that needs the store lives in the process that owns it (the logger hosts them).
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

__all__ = ["Client", "StoreLockedError", "chdb_path", "is_embedded", "make_client"]

# Inserts here are already batched by the caller; chdb (engine 26.9) defaults to async_insert=1,
# which adds up to ~200 ms per insert and ignores insert_deduplication_token.
_DEFAULT_SETTINGS: dict[str, Any] = {"async_insert": 0}


class StoreLockedError(RuntimeError):
    """Another process owns the embedded ClickHouse directory."""


def is_embedded(dsn: str) -> bool:
    return dsn.startswith("chdb:")


def _lock_holder(path: Path) -> str | None:
    """Who holds the engine's lock on `path` (its status file), None when nobody does.

    chdb reports a lock conflict with an unhelpful message, so the lock is probed after a failure.
    """
    status = path / "status"
    try:
        with status.open("rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                details = handle.read(200).decode(errors="replace").replace("\n", " ").strip()
                return details or "locked"
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def chdb_path(dsn: str) -> Path | None:
    """The data directory of a chdb DSN, None for the in-memory engine; rejects relative paths."""
    parsed = urlparse(dsn)
    if parsed.netloc == "memory":
        return None
    if parsed.netloc or not parsed.path.startswith("/"):
        raise ValueError(f"chdb DSN must be chdb://memory or chdb:///absolute/path, got {dsn!r}")
    return Path(parsed.path)


def make_client(dsn: str, *, readonly: bool = False, settings: dict[str, Any] | None = None) -> Client:
    """A client for `dsn`. readonly=True gives a session that cannot write or change `readonly`
    (ClickHouse readonly=2: other settings such as limits may still be set per query).

    Each client has its own session (for chdb, its own handle on the one engine), so a readonly
    client and a writing client can be used side by side from different threads.
    """
    client_settings: dict[str, Any] = {**_DEFAULT_SETTINGS, **(settings or {})}
    if readonly:
        client_settings["readonly"] = 2  # applied last: after it, only non-readonly settings may change
    if is_embedded(dsn):
        path = chdb_path(dsn)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        try:
            return clickhouse_connect.get_client(dsn=dsn, settings=client_settings)
        except Exception as error:
            holder = _lock_holder(path) if path is not None else None
            if holder is not None:
                raise StoreLockedError(
                    f"embedded ClickHouse at {path} is in use ({holder}); chdb allows one process per directory "
                    "and one directory per process: go through the logger service's gRPC API instead"
                ) from error
            raise
    scheme = urlparse(dsn).scheme
    if scheme not in ("http", "https", "clickhouse", "clickhouses"):
        raise ValueError(f"unsupported ClickHouse DSN {dsn!r}: use chdb:///path, chdb://memory or http(s)://host:port")
    return clickhouse_connect.get_client(dsn=dsn, settings=client_settings)
