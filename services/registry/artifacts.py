"""Content-addressed, immutable artifact storage.

A version's artifact is a Triton model directory. Every file is stored once under its sha256
(identical files across versions are deduplicated); the artifact itself is a manifest listing
(path, sha256, size), and its digest is the sha256 of that canonical manifest. Blobs are
read-only once written and verified on every read, so an artifact cannot change under a digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from services.common import errors

IGNORED_PARTS = {"__pycache__", ".git", ".DS_Store"}


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def canonical(self) -> bytes:
        rows = [[e.path, e.sha256, e.size] for e in sorted(self.entries, key=lambda e: e.path)]
        return json.dumps(rows, separators=(",", ":")).encode()

    @classmethod
    def from_canonical(cls, data: bytes) -> Manifest:
        return cls(tuple(ManifestEntry(p, s, int(n)) for p, s, n in json.loads(data)))


def _clean_relative_path(path: str) -> str:
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise errors.InvalidArgument(f"files: artifact path {path!r} must be relative and stay inside the artifact")
    return str(pure)


def read_directory(source: Path) -> dict[str, bytes]:
    """The files of a model directory (caches and VCS folders skipped), by relative path."""
    if not source.is_dir():
        raise errors.InvalidArgument(f"source_path: {source} is not a directory")
    files: dict[str, bytes] = {}
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and not IGNORED_PARTS.intersection(relative.parts) and path.suffix != ".pyc":
            files[relative.as_posix()] = path.read_bytes()
    return files


class ArtifactStore(Protocol):
    def put(self, files: Mapping[str, bytes]) -> Manifest: ...

    def manifest(self, digest: str) -> Manifest: ...

    def read(self, digest: str) -> dict[str, bytes]: ...


class LocalArtifactStore:
    """Blobs under root/blobs/sha256/ab/<digest>, manifests under root/manifests/<digest>."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def _write_once(self, path: Path, data: bytes) -> None:
        if path.exists():
            return  # content-addressed: same name, same bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        partial.write_bytes(data)
        partial.chmod(0o444)
        os.replace(partial, path)

    def put(self, files: Mapping[str, bytes]) -> Manifest:
        if not files:
            raise errors.InvalidArgument("files: the artifact is empty")
        entries = []
        for raw_path, data in files.items():
            path = _clean_relative_path(raw_path)
            sha = hashlib.sha256(data).hexdigest()
            self._write_once(self._blob_path(sha), data)
            entries.append(ManifestEntry(path, sha, len(data)))
        manifest = Manifest(tuple(sorted(entries, key=lambda e: e.path)))
        self._write_once(self.root / "manifests" / manifest.digest, manifest.canonical())
        return manifest

    def manifest(self, digest: str) -> Manifest:
        path = self.root / "manifests" / digest
        if not path.is_file():
            raise errors.NotFound(f"artifact {digest} is not in the store")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise errors.Internal(f"artifact manifest {digest} is corrupt (digest mismatch)")
        return Manifest.from_canonical(data)

    def read(self, digest: str) -> dict[str, bytes]:
        files = {}
        for entry in self.manifest(digest).entries:
            data = self._blob_path(entry.sha256).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise errors.Internal(f"artifact {digest}: blob of {entry.path} is corrupt (digest mismatch)")
            files[entry.path] = data
        return files
