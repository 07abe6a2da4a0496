"""HTTP-facing errors of the frontend, in OpenAI's error JSON shape.

Owns ``ApiError`` (an HTTP status plus OpenAI's ``{"error": {message, type, param, code}}`` body,
and the headers it needs) and the constructors for the cases the frontend answers: bad input (400,
``param`` names the field), no or a wrong API key (401), unknown model (404), a body or prompt over
a limit (413), saturation (429), worker error (500), no worker (503), deadline (504). ``Refusal``
names why a request was refused before any worker saw it (the ``refusals_total{reason}`` metric).

Invariants: every error response the frontend sends, including FastAPI's own validation errors
and unexpected failures, has this body shape, so OpenAI clients raise their typed exceptions
(``BadRequestError``...); every refusal a client may retry (429, and 503 for no worker) carries
``Retry-After``; every 401 carries ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from fabric.errors import FabricError

_STATUS_TO_TYPE = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}
NO_WORKERS_RETRY_AFTER_S = 5
"""A worker that starts registers within seconds (its etcd record); retry then."""


class Refusal(Enum):
    """Why a request was refused before reaching a worker."""

    BODY_TOO_LARGE = "body_too_large"  # 413: bytes or JSON values over the limit
    PROMPT_TOO_LARGE = "prompt_too_large"  # 413: more prompt tokens than the limit
    QUEUE_FULL = "queue_full"  # 429: max_queued requests already wait
    NO_ROOM = "no_room"  # 429: no serving worker had room within the queue timeout
    NO_WORKERS = "no_workers"  # 503: no decode or aggregated worker is known


class ApiError(FabricError):
    """A request failed with an HTTP ``status``; ``param`` names the offending field, if any.

    Attributes:
        retry_after_s: sent as ``Retry-After`` (seconds) when set.
        refusal: set when the request was refused before reaching a worker.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        refusal: Refusal | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.refusal = refusal

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

    def headers(self) -> dict[str, str]:
        """The response headers this error needs (``Retry-After``, ``WWW-Authenticate``)."""
        headers = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def bad_request(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"the model {model!r} does not exist; this frontend serves {served!r} (see /v1/models)",
        param="model",
        code="model_not_found",
    )


def body_too_large(message: str) -> ApiError:
    return ApiError(413, message, code="body_too_large", refusal=Refusal.BODY_TOO_LARGE)


def prompt_too_large(message: str, param: str) -> ApiError:
    return ApiError(
        413, message, param=param, code="prompt_too_large", refusal=Refusal.PROMPT_TOO_LARGE
    )


def too_busy(message: str, refusal: Refusal, retry_after_s: int) -> ApiError:
    return ApiError(429, message, code="overloaded", retry_after_s=retry_after_s, refusal=refusal)


def no_workers(message: str) -> ApiError:
    return ApiError(
        503,
        message,
        code="no_workers",
        retry_after_s=NO_WORKERS_RETRY_AFTER_S,
        refusal=Refusal.NO_WORKERS,
    )


def worker_error(message: str) -> ApiError:
    return ApiError(500, message, code="worker_error")


def internal_error(message: str) -> ApiError:
    return ApiError(500, message, code="internal_error")


def deadline_exceeded(message: str) -> ApiError:
    return ApiError(504, message, code="timeout")
