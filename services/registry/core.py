"""The registry's domain: versions, stages, aliases, swaps into Triton, and the routing table.

Transport-free: the gRPC servicer converts messages and calls these methods. Blocking database
work runs in a worker thread; Triton calls are asyncio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common import errors
from services.common.domain import MODEL_KIND_LLM, MODEL_KIND_TABULAR
from services.common.routing import ModelRoute, RouteTable, RouteTarget
from services.registry import stages
from services.registry.artifacts import ArtifactStore
from services.registry.audit import ChainVerdict, verify_chain
from services.registry.card import model_card
from services.registry.deployer import DeploymentError, TritonDeployer, triton_name, validate_artifact
from services.registry.fleet import RouterFleet
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore, VersionRecord, utc_now

log = logging.getLogger(__name__)

TABLE_COUNTER = "routing_table_version"
Progress = Callable[[str, str], None]


def _no_progress(_phase: str, _message: str) -> None:
    return None


@dataclass(slots=True)
class TableOverlay:
    """What a running rollout adds to a model's route: a canary split or a shadow copy."""

    experiment: Any = None
    shadows: tuple = ()


@dataclass(slots=True)
class _Watchers:
    table: RouteTable = field(default_factory=RouteTable)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    closed: bool = False


class Registry:
    def __init__(
        self,
        settings: RegistrySettings,
        store: RegistryStore,
        artifacts: ArtifactStore,
        deployer: TritonDeployer,
        fleet: RouterFleet | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.deployer = deployer
        self.fleet = fleet or RouterFleet()
        self.overlays: dict[str, TableOverlay] = {}
        self._watch = _Watchers()
        self._model_locks: dict[str, asyncio.Lock] = {}
        # Set by the rollout controller: a model with a rollout in progress refuses direct swaps.
        self.rollout_active: Callable[[str], Any] = lambda _model: None

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        def run() -> Any:
            with self.store.transaction() as conn:
                return fn(conn, *args)

        return await asyncio.to_thread(run)

    def model_lock(self, model: str) -> asyncio.Lock:
        return self._model_locks.setdefault(model, asyncio.Lock())

    async def audit(self, actor: str, action: str, subject: str, reason: str, **details: Any) -> None:
        await self.db(self.store.append_audit, actor, action, subject, reason, details)

    # -- startup ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.publish_table()

    async def reconcile(self) -> list[str]:
        """Reloads deployed versions Triton lost (a restart forgets pushed models); returns them."""
        reloaded = []
        for record in await self.list_versions():
            if record.triton_model and record.stage in (stages.PRODUCTION, stages.CANARY):
                loaded = await self.deployer.loaded_artifact(record.triton_model)
                if loaded != record.artifact_sha256:
                    if loaded is not None:
                        log.warning("%s in Triton was loaded from other content (%s); loading v%d's artifact",
                                    record.triton_model, loaded or "unstamped", record.version)
                    files = await asyncio.to_thread(self.artifacts.read, record.artifact_sha256)
                    try:
                        await self.deployer.load(record.triton_model, files, record.artifact_sha256)
                        reloaded.append(record.triton_model)
                    except DeploymentError as exc:
                        log.warning("could not reload %s: %s", record.triton_model, exc.message)
        return reloaded

    async def keep_reconciled(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_s)
            try:
                reloaded = await self.reconcile()
                if reloaded:
                    log.info("reloaded into Triton after it lost them: %s", ", ".join(reloaded))
            except Exception:  # keep the loop alive through a Triton outage
                log.debug("reconcile pass failed", exc_info=True)

    # -- versions --------------------------------------------------------------------------------

    async def register(
        self,
        actor: str,
        model: str,
        kind: str,
        files: Mapping[str, bytes],
        description: str = "",
        lineage: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> VersionRecord:
        if not model or len(model) > 200 or not model.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise errors.InvalidArgument("model: a name of letters, digits, '-', '_' or '.' (max 200) is required")
        if kind and kind not in (MODEL_KIND_TABULAR, MODEL_KIND_LLM):
            raise errors.InvalidArgument(f"kind: '{kind}' is not one of tabular, llm")
        validate_artifact(files)
        manifest = await asyncio.to_thread(self.artifacts.put, files)

        def write(conn: Any) -> VersionRecord:
            known_kind = self.store.model_kind(conn, model)
            if known_kind is None:
                if not kind:
                    raise errors.InvalidArgument(
                        f"kind: model '{model}' is new, so its kind (tabular or llm) is required"
                    )
                self.store.create_model(conn, model, kind)
            elif kind and kind != known_kind:
                raise errors.InvalidArgument(f"kind: model '{model}' is {known_kind}, not {kind}")
            record = VersionRecord(
                model=model,
                version=self.store.next_version(conn, model),
                kind=known_kind or kind,
                stage=stages.DEVELOPMENT,
                artifact_sha256=manifest.digest,
                artifact_bytes=manifest.total_bytes,
                artifact_files=len(manifest.entries),
                created_at=utc_now(),
                created_by=actor,
                description=description,
                lineage=lineage or {},
                tags=tags or {},
            )
            self.store.insert_version(conn, record)
            self.store.append_audit(
                conn, actor, "register", model, description or "new version",
                {"version": record.version, "artifact_sha256": manifest.digest, "bytes": manifest.total_bytes},
            )
            return record

        return await asyncio.to_thread(self._in_transaction, write)

    def _in_transaction(self, fn: Callable[[Any], Any]) -> Any:
        with self.store.transaction() as conn:
            return fn(conn)

    async def list_versions(self, model: str = "") -> list[VersionRecord]:
        return await self.db(self.store.versions, model or None)

    async def resolve(self, model: str, ref: str = "") -> VersionRecord:
        """A version number, an alias, or '' for the production version."""

        def find(conn: Any) -> VersionRecord:
            if ref.isdigit():
                return self.store.version(conn, model, int(ref))
            if ref:
                number = self.store.alias_version(conn, model, ref)
                if number is None:
                    raise errors.NotFound(f"version: model '{model}' has no version or alias '{ref}'")
                return self.store.version(conn, model, number)
            for record in self.store.versions(conn, model):
                if record.stage == stages.PRODUCTION:
                    return record
            if self.store.model_kind(conn, model) is None:
                raise errors.NotFound(f"model: unknown model '{model}'")
            raise errors.NotFound(f"version: model '{model}' has no production version")

        return await asyncio.to_thread(self._in_transaction, find)

    async def card(self, record: VersionRecord) -> str:
        return model_card(record)

    async def set_alias(self, actor: str, model: str, ref: str, alias: str, reason: str) -> VersionRecord:
        if not alias or alias.isdigit():
            raise errors.InvalidArgument("alias: a non-numeric name such as 'champion' is required")
        record = await self.resolve(model, ref)

        def write(conn: Any) -> None:
            self.store.set_alias(conn, model, alias, record.version)
            details = {"alias": alias, "version": record.version}
            self.store.append_audit(conn, actor, "set_alias", model, reason, details)

        await asyncio.to_thread(self._in_transaction, write)
        return await self.resolve(model, str(record.version))

    async def production(self, model: str) -> VersionRecord | None:
        for record in await self.list_versions(model):
            if record.stage == stages.PRODUCTION:
                return record
        return None

    # -- stage transitions and swaps -------------------------------------------------------------

    async def transition(
        self, actor: str, model: str, ref: str, stage: str, reason: str, progress: Progress = _no_progress
    ) -> VersionRecord:
        stages.check_stage_name(stage)
        async with self.model_lock(model):
            record = await self.resolve(model, ref)
            stages.check_transition(record.stage, stage)
            if stage in (stages.PRODUCTION, stages.ARCHIVED) and self.rollout_active(model) is not None:
                raise errors.FailedPrecondition(f"model '{model}' has a rollout in progress; abort it first")
            if stage == stages.PRODUCTION:
                return await self.swap_locked(actor, record, reason, progress)
            if stage == stages.CANARY:
                raise errors.FailedPrecondition("stage: a version enters canary through `rollout start`")
            await self.set_stage(actor, record, stage, reason)
            progress("stage", f"{model} v{record.version}: {record.stage} -> {stage}")
            return await self.resolve(model, str(record.version))

    async def set_stage(self, actor: str, record: VersionRecord, stage: str, reason: str, **details: Any) -> None:
        def write(conn: Any) -> None:
            self.store.set_stage(conn, record.model, record.version, stage)
            self.store.append_audit(
                conn, actor, "transition", record.model, reason,
                {"version": record.version, "from": record.stage, "to": stage, **details},
            )

        await asyncio.to_thread(self._in_transaction, write)

    async def ensure_loaded(self, record: VersionRecord, progress: Progress) -> str:
        """Loads and warms the version in Triton (if it is not already); returns its Triton name."""
        name = record.triton_model or triton_name(record.model, record.version)
        # Ready under that name is not enough: it must hold this version's artifact.
        if await self.deployer.loaded_artifact(name) != record.artifact_sha256:
            progress("loading", f"pushing {record.artifact_files} files ({record.artifact_bytes} bytes) as {name}")
            files = await asyncio.to_thread(self.artifacts.read, record.artifact_sha256)
            await self.deployer.load(name, files, record.artifact_sha256)
        progress("warming", f"{self.deployer.warmup_requests} warm-up requests to {name}")
        try:
            await self.deployer.warm_up(name, record.kind)
        except DeploymentError:
            await self.deployer.unload(name)
            raise
        if not record.triton_model:
            await self.db(self.store.set_triton_model, record.model, record.version, name)
        return name

    async def swap_locked(
        self, actor: str, record: VersionRecord, reason: str, progress: Progress, *, action: str = "deploy"
    ) -> VersionRecord:
        """Zero-downtime swap: the new version serves before the old one stops."""
        started = time.monotonic()
        old = await self.production(record.model)
        try:
            name = await self.ensure_loaded(record, progress)
        except DeploymentError as exc:
            await self.audit(actor, f"{action}_failed", record.model, exc.message, version=record.version)
            progress("failed", exc.message)
            raise

        def write(conn: Any) -> None:
            if old is not None:
                self.store.set_stage(conn, old.model, old.version, stages.ARCHIVED)
            self.store.set_stage(conn, record.model, record.version, stages.PRODUCTION)
            self.store.append_audit(
                conn, actor, action, record.model, reason,
                {"version": record.version, "replaced": old.version if old else None, "triton_model": name},
            )

        await asyncio.to_thread(self._in_transaction, write)
        self.overlays.pop(record.model, None)
        table_version = await self.publish_table()
        progress("routing", f"routing table v{table_version}: {record.model} -> v{record.version}")
        if old is not None and old.triton_model and old.triton_model != name:
            await self.drain_and_unload(old, table_version, progress)
        progress("done", f"{record.model} v{record.version} is in production ({time.monotonic() - started:.1f}s)")
        return await self.resolve(record.model, str(record.version))

    async def drain_and_unload(self, old: VersionRecord, table_version: int, progress: Progress) -> None:
        applied = await self.fleet.wait_applied(table_version, self.settings.route_apply_timeout_s)
        if not applied:
            log.warning("not every router confirmed table v%d; draining anyway", table_version)
        progress("draining", f"waiting for in-flight requests on v{old.version}")
        # Reports sent after the flip show what is still in flight on the old version.
        await self.fleet.wait_until(
            lambda: self.fleet.in_flight(old.model, str(old.version)) == 0, self.settings.drain_timeout_s,
            min_reports=1,
        )
        progress("unloading", f"unloading {old.triton_model}")
        await self.deployer.unload(old.triton_model)

    async def rollback(self, actor: str, model: str, reason: str, progress: Progress = _no_progress) -> VersionRecord:
        """Puts back the version that the current production one replaced."""
        async with self.model_lock(model):
            if self.rollout_active(model) is not None:
                raise errors.FailedPrecondition(f"model '{model}' has a rollout in progress; abort it instead")
            current = await self.production(model)
            if current is None:
                raise errors.FailedPrecondition(f"model '{model}' has no production version to roll back")
            previous = None
            for entry in reversed(await self.db(self.store.audit_entries, model)):
                details = json.loads(entry.details_json)
                if entry.action in ("deploy", "rollback", "promote") and details.get("version") == current.version:
                    previous = details.get("replaced")
                    break
            if previous is None:
                raise errors.FailedPrecondition(f"model '{model}' v{current.version} replaced no earlier version")
            target = await self.resolve(model, str(previous))
            return await self.swap_locked(actor, target, reason or "rollback", progress, action="rollback")

    # -- routing table ---------------------------------------------------------------------------

    def build_table(self, versions: list[VersionRecord], version: int) -> RouteTable:
        routes = []
        for record in versions:
            if record.stage != stages.PRODUCTION or not record.triton_model:
                continue
            stable = RouteTarget(record.triton_model, "", str(record.version))
            overlay = self.overlays.get(record.model)
            routes.append(
                ModelRoute(
                    record.model,
                    record.kind,
                    stable,
                    overlay.experiment if overlay else None,
                    overlay.shadows if overlay else (),
                )
            )
        return RouteTable(version, tuple(routes))

    async def publish_table(self) -> int:
        versions = await self.list_versions()
        number = await self.db(self.store.bump_counter, TABLE_COUNTER)
        table = self.build_table(versions, number)
        async with self._watch.changed:
            self._watch.table = table
            self._watch.changed.notify_all()
        return number

    @property
    def table(self) -> RouteTable:
        return self._watch.table

    async def watch(self, known_version: int = 0) -> AsyncIterator[RouteTable]:
        """The current table (unless the caller has it) and then each new one."""
        sent = [known_version]
        while True:
            async with self._watch.changed:
                await self._watch.changed.wait_for(
                    lambda: self._watch.closed or self._watch.table.version != sent[0]
                )
                if self._watch.closed:
                    return
                table = self._watch.table
            sent[0] = table.version
            yield table

    def close_watchers(self) -> None:
        """Ends every watch stream so a shutting-down registry does not wait on them."""
        self._watch.closed = True

        async def notify() -> None:
            async with self._watch.changed:
                self._watch.changed.notify_all()

        self._close_task = asyncio.get_running_loop().create_task(notify())

    # -- audit -----------------------------------------------------------------------------------

    async def audit_entries(self, subject: str = "", limit: int = 100) -> list:
        return await self.db(self.store.audit_entries, subject, limit)

    async def verify_audit(self) -> ChainVerdict:
        return verify_chain(await self.db(self.store.audit_entries, "", None))


async def run_with_progress(
    operation: Callable[[Progress], Awaitable[Any]],
) -> AsyncIterator[tuple[str, str, Any]]:
    """Runs operation(progress) and yields (phase, message, None) as it reports, then ("result", "", value)."""
    queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
    task = asyncio.create_task(operation(lambda phase, message: queue.put_nowait((phase, message, None))))
    task.add_done_callback(lambda _t: queue.put_nowait(("", "", None)))
    try:
        while True:
            phase, message, value = await queue.get()
            if not phase:
                break
            yield phase, message, value
        yield "result", "", task.result()
    finally:
        if not task.done():
            task.cancel()
