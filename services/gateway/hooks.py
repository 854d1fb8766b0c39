"""Extension points on the request path: inline checks before/after the model, and observers
told about every finished request (event emission). Observers must not block: they hand the
record to a bounded buffer and return."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.domain import (
    GenerateInput,
    GenerationUsage,
    PredictInput,
    PredictResult,
    ServedBy,
)
from services.gateway.keys import Tenant


@dataclass(slots=True)
class CompletedRequest:
    prediction_id: str
    tenant: str
    rpc: str  # "Predict" or "Generate"
    request: PredictInput | GenerateInput
    served_by: ServedBy | None
    status: str  # "OK" or the gRPC status name
    error: str
    started_at_unix: float
    latency_ms: float
    trace_id: str
    result: PredictResult | None = None
    completion_text: str = ""
    finish_reason: str = ""
    usage: GenerationUsage | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class FeedbackRecord:
    feedback_id: str
    prediction_id: str
    tenant: str
    unit_id: str
    created_at_unix: float
    label: str
    rating: float | None
    outcome: str
    text: str
    trace_id: str


class GatewayHook:
    """Base with no-op defaults; subclasses override what they need. Raise a MeshError to reject."""

    accepts_feedback = False  # hooks that publish feedback set this

    async def check_input(self, tenant: Tenant, request: PredictInput | GenerateInput) -> None:
        return None

    async def check_output(self, tenant: Tenant, request: PredictInput, result: PredictResult) -> None:
        return None

    async def check_generated_text(self, tenant: Tenant, request: GenerateInput, text_so_far: str) -> None:
        return None

    def on_complete(self, record: CompletedRequest) -> None:
        return None

    def on_feedback(self, feedback: FeedbackRecord) -> bool:
        """True when this hook took the feedback (published or queued it)."""
        return False
