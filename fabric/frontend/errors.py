"""HTTP-facing errors of the frontend, in OpenAI's error JSON shape.

Owns ``ApiError`` (an HTTP status plus OpenAI's ``{"error": {message, type, param, code}}`` body)
and the constructors for the cases the frontend answers: bad input (400, ``param`` names the
field), unknown model (404), worker error (500), no worker (503), deadline (504).

Invariant: every error response the frontend sends, including FastAPI's own validation errors,
has this body shape, so OpenAI clients raise their typed exceptions (``BadRequestError``...).
"""

from __future__ import annotations

from typing import Any

from fabric.errors import FabricError

_STATUS_TO_TYPE = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(FabricError):
    """A request failed with an HTTP ``status``; ``param`` names the offending field, if any."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def error_type(self) -> str:
        return _STATUS_TO_TYPE.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"the model {model!r} does not exist; this frontend serves {served!r} (see /v1/models)",
        param="model",
        code="model_not_found",
    )


def no_workers(message: str) -> ApiError:
    return ApiError(503, message, code="no_workers")


def worker_error(message: str) -> ApiError:
    return ApiError(500, message, code="worker_error")


def deadline_exceeded(message: str) -> ApiError:
    return ApiError(504, message, code="timeout")
