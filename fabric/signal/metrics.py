"""Signal errors of this process, by side and kind (Prometheus counters).

The server and client count here every message they refuse, drop or could not deliver; the
metrics live in this module's own ``REGISTRY`` (signal sockets are the process's, whatever owns
them), which a process serving ``/metrics`` registers into its registry (the worker runtime, the
frontend). ``fabric_signal_errors_total{side,kind}``, ``side`` ``server`` or ``client``, ``kind``
a ``SignalErrorKind``:

* ``timeout``: a request got no reply in time (client), or the server thread did not send a
  push in time (server);
* ``malformed`` / ``too_large`` / ``incompatible``: a message that could not be read (bad
  msgpack, framing or fields; over the size limit; another protocol version, message type or
  compat hash), refused by the server or dropped by the client;
* ``connection_lost``: the peer is not connected or not reading (a push or reply not
  delivered, a full send queue);
* ``remote_error``: the peer answered an ``ErrorReply`` (client);
* ``handler_failed``: the server's handler raised or had no reply to a request (server).
"""

from __future__ import annotations

from enum import Enum

from prometheus_client import CollectorRegistry, Counter

from fabric.signal.errors import ErrorCode

REGISTRY = CollectorRegistry()


class SignalErrorKind(Enum):
    TIMEOUT = "timeout"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    INCOMPATIBLE = "incompatible"
    CONNECTION_LOST = "connection_lost"
    REMOTE_ERROR = "remote_error"
    HANDLER_FAILED = "handler_failed"


class Side(Enum):
    SERVER = "server"
    CLIENT = "client"


_ERRORS = Counter(
    "fabric_signal_errors",
    "Signal messages refused, dropped or not delivered, by side and kind.",
    ["side", "kind"],
    registry=REGISTRY,
)
_CODE_TO_KIND = {
    ErrorCode.MALFORMED: SignalErrorKind.MALFORMED,
    ErrorCode.TOO_LARGE: SignalErrorKind.TOO_LARGE,
    ErrorCode.UNSUPPORTED_VERSION: SignalErrorKind.INCOMPATIBLE,
    ErrorCode.UNKNOWN_TYPE: SignalErrorKind.INCOMPATIBLE,
    ErrorCode.INCOMPATIBLE: SignalErrorKind.INCOMPATIBLE,
}


def record(side: Side, kind: SignalErrorKind) -> None:
    _ERRORS.labels(side.value, kind.value).inc()


def record_unreadable(side: Side, code: ErrorCode) -> None:
    """A message ``decode`` refused with ``code``."""
    record(side, _CODE_TO_KIND.get(code, SignalErrorKind.MALFORMED))
