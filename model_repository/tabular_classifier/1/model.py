"""Triton python-backend model: the breast-cancer classifier's ONNX graph run by onnxruntime."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        # One thread: Triton's dynamic batcher provides the parallelism, not onnxruntime.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        # Fault injection for rollout drills: a version registered with these config parameters
        # is deliberately bad (fails a share of batches, or answers slowly). Both default to off.
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.fault_error_rate = float(parameters.get("fault_error_rate", {}).get("string_value", "0") or 0)
        self.fault_delay_s = float(parameters.get("fault_delay_ms", {}).get("string_value", "0") or 0) / 1000
        # Faults start after this many batches: a version that passes warm-up, then fails live.
        self.fault_after_batches = int(parameters.get("fault_after_batches", {}).get("string_value", "0") or 0)
        self.batches_seen = 0

    def _injected_fault(self) -> str | None:
        self.batches_seen += 1
        if self.batches_seen <= self.fault_after_batches:
            return None
        if self.fault_delay_s > 0:
            time.sleep(self.fault_delay_s)
        if self.fault_error_rate > 0 and random.random() < self.fault_error_rate:
            return f"injected fault (fault_error_rate={self.fault_error_rate})"
        return None

    def execute(self, requests: list[Any]) -> list[Any]:
        # The dynamic batcher hands over several requests: run them as one batch.
        fault = self._injected_fault()
        if fault is not None:
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(fault)) for _ in requests]
        batches = [pb_utils.get_input_tensor_by_name(request, "features").as_numpy() for request in requests]
        try:
            labels, probabilities = self.session.run(
                ["label", "probabilities"], {"features": np.concatenate(batches).astype(np.float32, copy=False)}
            )
        except Exception as error:  # report to every caller instead of killing the instance
            failure = pb_utils.TritonError(f"onnxruntime failed: {error}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=failure) for _ in requests]

        split_points = np.cumsum([len(batch) for batch in batches])[:-1]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("label", request_labels.reshape(-1, 1).astype(np.int64, copy=False)),
                    pb_utils.Tensor("probabilities", request_probabilities.astype(np.float32, copy=False)),
                ]
            )
            for request_labels, request_probabilities in zip(
                np.split(labels, split_points), np.split(probabilities, split_points), strict=True
            )
        ]
