"""Generates the Python gRPC stubs from protos/ into services/common/gen (run by `make install`).

Stubs are generated, not committed, so they can never drift from the .proto sources. Generated
imports (`from mlmesh.v1 import ...`) are rewritten to live inside this package.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GEN_ROOT = Path(__file__).resolve().parent / "gen"
_STAMP = GEN_ROOT / ".sources-sha256"


def _sources_digest(protos: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in protos:
        digest.update(path.relative_to(PROTO_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def generate(force: bool = False) -> None:
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    digest = _sources_digest(protos)
    if not force and _STAMP.exists() and _STAMP.read_text() == digest:
        return
    GEN_ROOT.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={GEN_ROOT}",
        f"--pyi_out={GEN_ROOT}",
        f"--grpc_python_out={GEN_ROOT}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for generated in GEN_ROOT.rglob("*.py*"):
        text = generated.read_text()
        rewritten = re.sub(r"^from mlmesh\.", "from services.common.gen.mlmesh.", text, flags=re.M)
        if rewritten != text:
            generated.write_text(rewritten)
    for package in [GEN_ROOT, *[p for p in GEN_ROOT.rglob("*") if p.is_dir()]]:
        (package / "__init__.py").touch()
    _STAMP.write_text(digest)
    print(f"generated stubs for {len(protos)} protos in {GEN_ROOT.relative_to(REPO_ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    generate(force="--force" in sys.argv)
