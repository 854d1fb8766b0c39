"""MLServer runtime for the benchmark peer: the same ONNX file Triton serves, run by onnxruntime.

Runs inside .venv-mlserver (bench/setup_mlserver.sh), never in the mesh's .venv. It mirrors the
Triton python-backend model (model_repository/tabular_classifier/1/model.py) so the comparison is
about the serving stack, not the model: one onnxruntime session, one intra-op thread, input
`features` FP32 [N, 30], outputs `label` INT64 [N, 1] and `probabilities` FP32 [N, 2].
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxTabularRuntime(MLModel):
    async def load(self) -> bool:
        model_path = await get_model_uri(self.settings, wellknown_filenames=["model.onnx"])
        options = ort.SessionOptions()
        # Same threading as the Triton model: one intra-op thread, parallelism comes from the server.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        features = None
        for request_input in payload.inputs:
            if request_input.name == "features":
                features = NumpyCodec.decode_input(request_input)
        if features is None:
            raise ValueError("missing input 'features'")
        labels, probabilities = self._session.run(
            ["label", "probabilities"], {"features": features.astype(np.float32, copy=False).reshape(-1, 30)}
        )
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output("label", labels.reshape(-1, 1).astype(np.int64, copy=False)),
                NumpyCodec.encode_output("probabilities", probabilities.astype(np.float32, copy=False)),
            ],
        )
