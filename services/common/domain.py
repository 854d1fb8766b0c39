"""Plain, transport-free types shared by the gateway and the router."""

from __future__ import annotations

from dataclasses import dataclass, field

# Bytes per element for each KServe v2 dtype; BYTES is variable-length.
DTYPE_ITEMSIZE: dict[str, int | None] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": None,
}

MODEL_KIND_TABULAR = "tabular"
MODEL_KIND_LLM = "llm"


@dataclass(slots=True)
class TensorData:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 = variable; includes the batch dimension when the model batches


@dataclass(frozen=True, slots=True)
class ServedBy:
    model: str
    model_version: str
    experiment: str = ""
    variant: str = ""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    kind: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int = 0
    ready: bool = False


@dataclass(slots=True)
class RequestContext:
    """Who asked, under which prediction id, and how long the answer may take."""

    prediction_id: str
    tenant: str
    timeout_s: float | None = None


@dataclass(slots=True)
class PredictInput:
    model: str
    inputs: list[TensorData]
    outputs: list[str] = field(default_factory=list)
    request_id: str = ""
    unit_id: str = ""


@dataclass(slots=True)
class PredictResult:
    prediction_id: str
    served_by: ServedBy
    outputs: list[TensorData]


@dataclass(slots=True)
class GenerateInput:
    model: str
    prompt: str
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    request_id: str = ""
    unit_id: str = ""


@dataclass(slots=True)
class GenerateChunk:
    prediction_id: str
    text: str
    index: int
    served_by: ServedBy
    finish_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class FeedbackInput:
    prediction_id: str
    label: str = ""
    rating: float | None = None
    outcome: str = ""
    text: str = ""
    unit_id: str = ""


@dataclass(frozen=True, slots=True)
class GenerationUsage:
    input_tokens: int
    output_tokens: int
    time_to_first_token_ms: float
    total_time_ms: float
