"""What a shadow call reports: the outcome of a copy of a request sent to a candidate target.

The caller never waits for it. The router counts it (shadow=True series) and hands it to an
optional ShadowObserver, for example to emit a PredictionEvent with shadow=true.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from services.common import errors
from services.common.domain import GenerateInput, PredictInput, ServedBy, TensorData


@dataclass(slots=True)
class ShadowResult:
    rpc: str  # "Predict" or "Generate"
    model: str  # public model name
    served_by: ServedBy  # the shadow target: experiment = the route's experiment (or ""), variant = shadow name
    prediction_id: str  # the prediction id of the request that was copied
    tenant: str
    request: PredictInput | GenerateInput
    started_at_unix: float
    latency_ms: float
    error: errors.MeshError | None = None
    outputs: list[TensorData] = field(default_factory=list)  # Predict
    completion_text: str = ""  # Generate
    finish_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def status(self) -> str:
        return self.error.status if self.error is not None else "OK"


class ShadowObserver(Protocol):
    """Called on the event loop once per finished shadow call; must not block (queue the work)."""

    def on_shadow_result(self, result: ShadowResult) -> None: ...
