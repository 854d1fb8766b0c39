#!/usr/bin/env bash
# Creates .venv-mlserver: the MLServer peer the benchmark compares against (idempotent).
# It never touches .venv. Pins come from the runbook: mlserver 1.7.1 needs uvloop 0.21.0
# (0.23 crashes its workers); onnxruntime/numpy match the mesh's .venv so both servers run
# the same ONNX file with the same engine. Nothing here may pull torch or CUDA (checked first).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv-mlserver
PINS=(
  mlserver==1.7.1
  uvloop==0.21.0
  onnxruntime==1.32.0
  numpy==1.26.4
  grpcio==1.85.1
  protobuf==6.33.6
)
# Optional sampling profiler for `python -m bench.run --profile pyspy` (lives here, not in .venv).
EXTRA=(py-spy==0.4.3)
stamp="$VENV/.installed-$(printf '%s\n' "${PINS[@]}" "${EXTRA[@]}" | cat - bench/setup_mlserver.sh | sha256sum | cut -c1-16)"

if [ -f "$stamp" ]; then
  exit 0
fi
echo "==> creating $VENV (MLServer peer for the benchmark)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# The local indexes make pip warn about every missing mirror directory: drop that noise.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  return "${PIPESTATUS[0]}"
}
pip install -q pip==24.3.1
# Resolve everything from scratch (--ignore-installed) and refuse torch/CUDA wheels.
plan=$(pip install --dry-run --ignore-installed "${PINS[@]}" | grep '^Would install' || true)
if [ -z "$plan" ]; then
  echo "refusing: could not resolve ${PINS[*]}" >&2
  exit 1
fi
if grep -Eqi '(^| )(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+)-[0-9]' <<<"$plan"; then
  echo "refusing: resolving ${PINS[*]} would install torch/CUDA packages:" >&2
  echo "$plan" >&2
  exit 1
fi
pip install -q "${PINS[@]}"
# py-spy is a convenience; a registry without it must not break the benchmark.
pip install -q "${EXTRA[@]}" || echo "warning: could not install ${EXTRA[*]} (no py-spy profiling)" >&2
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "==> $VENV ready"
