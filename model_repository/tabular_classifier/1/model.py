"""Triton python-backend model: the breast-cancer classifier's ONNX graph run by onnxruntime."""

from __future__ import annotations

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

    def execute(self, requests: list[Any]) -> list[Any]:
        # The dynamic batcher hands over several requests: run them as one batch.
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
