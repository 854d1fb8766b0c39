"""Assembles the registry: store, artifacts, Triton deployer, rollout controller, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from services.common.channels import internal_channel
from services.common.server import RunningServer, start_server
from services.registry import servicer
from services.registry.artifacts import LocalArtifactStore
from services.registry.bootstrap import SeedModel, seed_until_done
from services.registry.core import Registry
from services.registry.deployer import TritonDeployer
from services.registry.rollout import RolloutController
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore


@dataclass
class RegistryApp:
    registry: Registry
    rollouts: RolloutController
    server: RunningServer | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    async def stop(self) -> None:
        self.registry.close_watchers()
        if self.server is not None:
            await self.server.stop()
        await self.rollouts.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.registry.deployer.close()
        await asyncio.to_thread(self.registry.store.close)


async def start_registry(settings: RegistrySettings, *, serve: bool = True) -> RegistryApp:
    store = await asyncio.to_thread(RegistryStore, settings.database_url)
    registry = Registry(
        settings,
        store,
        LocalArtifactStore(Path(settings.artifact_dir)),
        TritonDeployer(settings.triton_url, settings.load_timeout_s, settings.warmup_requests),
    )
    channel = internal_channel(settings.analysis_address) if settings.analysis_address else None
    rollouts = RolloutController(registry, settings.rollout, analysis_channel=channel)
    await registry.start()
    await rollouts.load()
    app = RegistryApp(registry, rollouts)
    app.tasks.append(asyncio.create_task(registry.keep_reconciled()))
    if settings.seed:
        models = [SeedModel(s.name, s.kind, Path(s.directory), s.parameters, s.description) for s in settings.seed]
        app.tasks.append(asyncio.create_task(seed_until_done(registry, models)))
    if serve:
        app.server = await start_server("registry", [servicer.registration(registry, rollouts)], settings)
    return app
