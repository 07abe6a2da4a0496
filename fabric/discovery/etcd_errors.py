"""What a failed etcd call was: its gRPC status, details, and whether the member is unreachable.

Shared by ``EtcdRegistry`` (its errors, retries and failover) and ``EtcdWatch`` (failover of a
broken stream), over both kinds of failure pyetcd raises: ``grpc.RpcError`` from the raw stubs
and its own ``Etcd3Exception``s from the calls it wraps.
"""

from __future__ import annotations

import grpc
from pyetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError


def status_of(exc: BaseException | None) -> grpc.StatusCode | None:
    """The gRPC status code of ``exc`` (None: not a gRPC failure)."""
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def failure_kind(exc: BaseException, status: grpc.StatusCode | None) -> str:
    """The ``kind`` label of a failed call (``fabric.discovery.metrics``)."""
    if isinstance(exc, ConnectionTimeoutError) or status is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if isinstance(exc, ConnectionFailedError):
        return "unavailable"
    return "error" if status is None else status.name.lower()


def is_unreachable(exc: BaseException) -> bool:
    """A failure to connect or to answer in time (where a TLS handshake may be the cause)."""
    if isinstance(exc, ConnectionFailedError | ConnectionTimeoutError):
        return True
    return status_of(exc) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def details(exc: BaseException) -> str:
    """The failure's own words (gRPC details, else the exception's text)."""
    text = getattr(exc, "details", None)
    return str(text() if callable(text) else exc)
