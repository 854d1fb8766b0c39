"""Domain errors. Domain code raises these; the server bootstrap maps them to gRPC statuses."""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error a caller should see with a specific status and a clear message."""

    status = "INTERNAL"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(MeshError):
    status = "INVALID_ARGUMENT"


class NotFound(MeshError):
    status = "NOT_FOUND"


class Unauthenticated(MeshError):
    status = "UNAUTHENTICATED"


class PermissionDenied(MeshError):
    status = "PERMISSION_DENIED"


class ResourceExhausted(MeshError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(MeshError):
    status = "UNAVAILABLE"


class DeadlineExceeded(MeshError):
    status = "DEADLINE_EXCEEDED"


class FailedPrecondition(MeshError):
    status = "FAILED_PRECONDITION"


class Cancelled(MeshError):
    status = "CANCELLED"


class Internal(MeshError):
    status = "INTERNAL"
