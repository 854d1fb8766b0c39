"""Seeds a registry with models from directories (used by `mlmesh up` for the demo models).

A model whose production version already has the same artifact is only (re)loaded into Triton
(a restarted Triton has forgotten pushed models); a changed directory becomes a new version,
promoted through the normal staging -> production swap, so the audit log tells the story.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common import errors
from services.registry import stages
from services.registry.artifacts import Manifest, ManifestEntry, read_directory
from services.registry.core import Progress, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedModel:
    name: str
    kind: str
    directory: Path
    parameters: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


def with_parameters(files: dict[str, bytes], parameters: Mapping[str, str]) -> dict[str, bytes]:
    """Appends config.pbtxt parameters (a later key wins in Triton's text format)."""
    if not parameters:
        return files
    extra = "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())
    return {**files, "config.pbtxt": files["config.pbtxt"] + b"\n" + extra.encode()}


def _digest(files: Mapping[str, bytes]) -> str:
    entries = tuple(ManifestEntry(p, hashlib.sha256(d).hexdigest(), len(d)) for p, d in sorted(files.items()))
    return Manifest(entries).digest


async def seed(registry: Registry, model: SeedModel, progress: Progress, actor: str = "mlmesh-up") -> int:
    """Makes `model` serve from its directory; returns the production version number."""
    files = with_parameters(await asyncio.to_thread(read_directory, model.directory), model.parameters)
    current = await registry.production(model.name)
    if current is not None and current.artifact_sha256 == _digest(files):
        await registry.ensure_loaded(current, progress)
        return current.version
    record = await registry.register(actor, model.name, model.kind, files, model.description or "seeded")
    await registry.transition(actor, model.name, str(record.version), stages.STAGING, "seed")
    promoted = await registry.transition(actor, model.name, str(record.version), stages.PRODUCTION, "seed", progress)
    return promoted.version


async def seed_until_done(registry: Registry, models: list[SeedModel], retry_s: float = 5.0) -> None:
    """Background seeding for deployments where Triton may come up after the registry."""
    pending = list(models)
    while pending:
        for model in list(pending):
            try:
                version = await seed(registry, model, lambda phase, message: log.info("%s: %s", phase, message))
                log.info("seeded %s: v%d in production", model.name, version)
                pending.remove(model)
            except (errors.MeshError, OSError) as exc:
                log.warning("seeding %s failed (retrying in %.0fs): %s", model.name, retry_s, exc)
        if pending:
            await asyncio.sleep(retry_s)
