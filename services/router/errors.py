"""Router errors: one class per outcome, each knowing its gRPC code and OpenAI HTTP shape.

The gRPC servicer maps them with services.common.grpc_errors (registered here); the HTTP API
turns them into OpenAI's error body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import grpc

from services.common.grpc_errors import register_status


class RouterError(Exception):
    """Base: a request failed for a reason the client should see."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    openai_type = "server_error"
    openai_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.openai_type,
                          "param": self.param, "code": self.openai_code}}


class InvalidArgument(RouterError):
    """A malformed or out-of-range request; the message starts with the field path."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", param=field)
        self.field = field


class ModelNotFound(InvalidArgument):
    """An OpenAI `model` that is neither a tier name nor "auto"."""

    http_status = 404
    openai_code = "model_not_found"


class Unauthenticated(RouterError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "authentication_error"
    openai_code = "invalid_api_key"


class PermissionDenied(RouterError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    openai_type = "permission_error"
    openai_code = "permission_denied"


class RateLimited(RouterError):
    """A tenant limit was hit; `limit` names it, `retry_after_s` says when to come back."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_error"  # the Python client keys on the status, not this
    openai_code = "rate_limit_exceeded"

    def __init__(self, limit: str, message: str, retry_after_s: float):
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


class Overloaded(RateLimited):
    """The cluster is past its capacity: every replica that could serve the request refused it
    as full, or the router itself is at max_in_flight. Like a tenant limit it is refused early
    with RESOURCE_EXHAUSTED / HTTP 429 and a retry hint (gRPC trailing metadata `retry-after`,
    HTTP header Retry-After), so clients back off instead of piling on."""

    openai_code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0, limit: str = "capacity"):
        super().__init__(limit, message, retry_after_s)


class DeadlineExceeded(RouterError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    openai_type = "timeout"
    openai_code = "deadline_exceeded"


class Unavailable(RouterError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_code = "service_unavailable"


class WorkerFailed(RouterError):
    """A worker failed after output had been sent (not retryable)."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


for _cls in (RouterError, InvalidArgument, Unauthenticated, PermissionDenied, RateLimited,
             Overloaded, DeadlineExceeded, Unavailable, WorkerFailed):
    register_status(_cls, _cls.grpc_code)
