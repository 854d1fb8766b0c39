"""Protobuf <-> domain conversions, shared by every servicer and client of the mesh API."""

from __future__ import annotations

from services.common.api import common_pb2, gateway_pb2
from services.common.domain import (
    FeedbackInput,
    GenerateChunk,
    GenerateInput,
    ModelInfo,
    PredictInput,
    PredictResult,
    ServedBy,
    TensorData,
    TensorSpec,
)


def tensor_from_pb(t: common_pb2.Tensor) -> TensorData:
    return TensorData(t.name, t.dtype, tuple(t.shape), t.raw_data)


def tensor_to_pb(t: TensorData) -> common_pb2.Tensor:
    return common_pb2.Tensor(name=t.name, dtype=t.dtype, shape=t.shape, raw_data=t.data)


def served_by_to_pb(s: ServedBy) -> common_pb2.ServedBy:
    return common_pb2.ServedBy(model=s.model, model_version=s.model_version, experiment=s.experiment, variant=s.variant)


def served_by_from_pb(s: common_pb2.ServedBy) -> ServedBy:
    return ServedBy(s.model, s.model_version, s.experiment, s.variant)


def predict_input_from_pb(r: gateway_pb2.PredictRequest) -> PredictInput:
    return PredictInput(
        model=r.model,
        inputs=[tensor_from_pb(t) for t in r.inputs],
        outputs=list(r.outputs),
        request_id=r.request_id,
        unit_id=r.unit_id,
    )


def predict_input_to_pb(p: PredictInput) -> gateway_pb2.PredictRequest:
    return gateway_pb2.PredictRequest(
        model=p.model,
        inputs=[tensor_to_pb(t) for t in p.inputs],
        outputs=p.outputs,
        request_id=p.request_id,
        unit_id=p.unit_id,
    )


def predict_result_to_pb(r: PredictResult) -> gateway_pb2.PredictResponse:
    return gateway_pb2.PredictResponse(
        prediction_id=r.prediction_id,
        served_by=served_by_to_pb(r.served_by),
        outputs=[tensor_to_pb(t) for t in r.outputs],
    )


def predict_result_from_pb(r: gateway_pb2.PredictResponse) -> PredictResult:
    return PredictResult(r.prediction_id, served_by_from_pb(r.served_by), [tensor_from_pb(t) for t in r.outputs])


def generate_input_from_pb(r: gateway_pb2.GenerateRequest) -> GenerateInput:
    return GenerateInput(
        model=r.model,
        prompt=r.prompt,
        max_tokens=r.params.max_tokens,
        temperature=r.params.temperature,
        top_p=r.params.top_p,
        seed=r.params.seed,
        request_id=r.request_id,
        unit_id=r.unit_id,
    )


def generate_input_to_pb(g: GenerateInput) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        model=g.model,
        prompt=g.prompt,
        params=common_pb2.GenerationParams(
            max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed
        ),
        request_id=g.request_id,
        unit_id=g.unit_id,
    )


def chunk_to_pb(c: GenerateChunk, usage: common_pb2.Usage | None = None) -> gateway_pb2.GenerateResponse:
    response = gateway_pb2.GenerateResponse(
        prediction_id=c.prediction_id, text=c.text, index=c.index, finish_reason=c.finish_reason
    )
    if c.index == 0 or c.finish_reason:
        response.served_by.CopyFrom(served_by_to_pb(c.served_by))
    if usage is not None:
        response.usage.CopyFrom(usage)
    return response


def chunk_from_pb(r: gateway_pb2.GenerateResponse, served_by: ServedBy) -> GenerateChunk:
    return GenerateChunk(
        prediction_id=r.prediction_id,
        text=r.text,
        index=r.index,
        served_by=served_by_from_pb(r.served_by) if r.HasField("served_by") else served_by,
        finish_reason=r.finish_reason,
        input_tokens=r.usage.input_tokens,
        output_tokens=r.usage.output_tokens,
    )


def model_info_to_pb(m: ModelInfo) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name=m.name,
        version=m.version,
        kind=m.kind,
        inputs=[common_pb2.TensorSpec(name=s.name, dtype=s.dtype, shape=s.shape) for s in m.inputs],
        outputs=[common_pb2.TensorSpec(name=s.name, dtype=s.dtype, shape=s.shape) for s in m.outputs],
        max_batch_size=m.max_batch_size,
        ready=m.ready,
    )


def model_info_from_pb(m: common_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        version=m.version,
        kind=m.kind,
        inputs=tuple(TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in m.inputs),
        outputs=tuple(TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in m.outputs),
        max_batch_size=m.max_batch_size,
        ready=m.ready,
    )


def feedback_input_from_pb(r: gateway_pb2.FeedbackRequest) -> FeedbackInput:
    return FeedbackInput(
        prediction_id=r.prediction_id,
        label=r.label,
        rating=r.rating if r.HasField("rating") else None,
        outcome=r.outcome,
        text=r.text,
        unit_id=r.unit_id,
    )
