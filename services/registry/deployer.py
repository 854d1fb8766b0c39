"""Puts model versions into Triton through its model-control API and takes them out again.

Files are pushed with load_model(files=...), so Triton needs no shared volume with the registry:
the same code drives the local binary and a Triton container. Warm-up calls go through the
router's own Triton client, exactly as live traffic will.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from services.common import errors
from services.common.domain import MODEL_KIND_LLM, GenerateInput, TensorData
from services.router.triton import TritonBackend

log = logging.getLogger(__name__)

_NUMPY_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
                 "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


class DeploymentError(errors.FailedPrecondition):
    """A version could not be loaded or warmed up; what serves stays as it was."""


# Stamped into the config of every version the registry loads, so that a model of the same name
# loaded from other content (another registry on this Triton, a wiped database) is recognised.
ARTIFACT_PARAMETER = "mlmesh_artifact_sha256"


def triton_name(model: str, version: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', model)}_v{version}"


def model_config(files: Mapping[str, bytes], name: str) -> model_config_pb2.ModelConfig:
    raw = files.get("config.pbtxt")
    if raw is None:
        raise errors.InvalidArgument("files: a Triton model directory needs config.pbtxt at its top level")
    try:
        config = text_format.Parse(raw.decode(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(f"files: config.pbtxt does not parse: {exc}") from exc
    config.name = name
    return config


def validate_artifact(files: Mapping[str, bytes]) -> None:
    """Catches what would only fail at load time: no config, no version directory."""
    model_config(files, "check")
    if not any(re.match(r"^\d+/", path) for path in files):
        raise errors.InvalidArgument("files: a Triton model directory needs a version folder such as 1/")


class TritonDeployer:
    def __init__(self, grpc_url: str, load_timeout_s: float = 600.0, warmup_requests: int = 3) -> None:
        self.grpc_url = grpc_url
        self.load_timeout_s = load_timeout_s
        self.warmup_requests = warmup_requests
        self._control = InferenceServerClient(grpc_url)
        self._backend = TritonBackend(grpc_url)

    async def close(self) -> None:
        await self._control.close()
        await self._backend.close()

    async def load(self, name: str, files: Mapping[str, bytes], artifact_sha256: str) -> None:
        config = model_config(files, name)
        config.parameters[ARTIFACT_PARAMETER].string_value = artifact_sha256
        payload = {f"file:{path}": data for path, data in files.items() if path != "config.pbtxt"}
        config_json = json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))
        try:
            await self._control.load_model(name, config=config_json, files=payload, client_timeout=self.load_timeout_s)
        except InferenceServerException as exc:
            raise DeploymentError(f"Triton could not load {name}: {exc.message()}") from exc
        if not await self.is_ready(name):
            raise DeploymentError(f"Triton loaded {name} but it is not ready")

    async def loaded_artifact(self, name: str) -> str | None:
        """The artifact digest the ready model `name` was loaded from ("" if not stamped); None if not ready."""
        if not await self.is_ready(name):
            return None
        try:
            reply = await self._control.get_model_config(name, client_timeout=5.0)
        except InferenceServerException:
            return None
        parameter = reply.config.parameters.get(ARTIFACT_PARAMETER)
        return parameter.string_value if parameter is not None else ""

    async def is_ready(self, name: str) -> bool:
        try:
            return bool(await self._control.is_model_ready(name, client_timeout=5.0))
        except InferenceServerException:
            return False

    async def unload(self, name: str) -> None:
        try:
            await self._control.unload_model(name, client_timeout=60.0)
        except InferenceServerException as exc:
            log.warning("unloading %s failed: %s", name, exc.message())

    async def warm_up(self, name: str, kind: str) -> None:
        """A few real requests; any failure means the version must not take traffic."""
        try:
            if kind == MODEL_KIND_LLM:
                for _ in range(self.warmup_requests):
                    async for _token in self._backend.generate(name, "", GenerateInput(name, "Hello", max_tokens=2),
                                                               "warm-up", 120.0):
                        pass
                return
            info = await self._backend.model_info(name)
            inputs = []
            for spec in info.inputs:
                # Shapes include the batch dimension (-1) when the model batches: one row each.
                dims = [1 if d < 0 else d for d in spec.shape]
                dtype = _NUMPY_DTYPES.get(spec.dtype)
                if dtype is None:
                    raise DeploymentError(f"warm-up of {name}: input {spec.name} has dtype {spec.dtype}, "
                                          "which the registry cannot synthesise")
                inputs.append(TensorData(spec.name, spec.dtype, tuple(dims), np.zeros(dims, dtype=dtype).tobytes()))
            for _ in range(self.warmup_requests):
                await self._backend.infer(name, "", inputs, [], "warm-up", 30.0)
        except errors.MeshError as exc:
            if isinstance(exc, DeploymentError):
                raise
            raise DeploymentError(f"warm-up of {name} failed: {exc.message}") from exc
        except TimeoutError as exc:
            raise DeploymentError(f"warm-up of {name} timed out") from exc
