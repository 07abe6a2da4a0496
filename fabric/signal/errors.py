"""The signal error vocabulary: ``ErrorCode`` and the exceptions each code stands for.

Owns ``ErrorCode`` (the ``code`` slot of an ``ErrorReply`` on the wire), the ``SignalError``
hierarchy that ``messages.decode`` raises, and the table ``ERROR_CODE_TO_EXCEPTION`` a client uses
to turn a received ``ErrorReply`` back into an exception (``client.error_from_reply``). Imports
only ``fabric.errors``: the bottom of ``fabric.signal``, which ``messages``, ``client`` and
``server`` import and which imports none of them.

Invariants:

* Every ``SignalError`` subclass carries the ``ErrorCode`` a receiver answers with, so refusing a
  message is ``ErrorReply(None, exc.code, str(exc))`` and nothing else.
* ``ERROR_CODE_TO_EXCEPTION`` has an entry for every ``ErrorCode``; a code's exception class is
  the one whose ``code`` it is where such a class exists. Adding a code is a new protocol version.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

from fabric.errors import (
    FabricError,
    InvalidInput,
    PeerUnavailable,
    ProtocolMismatch,
    TransferTimeout,
)


class ErrorCode(Enum):
    """Why a peer refused or failed a message (the ``code`` of an ``ErrorReply``)."""

    MALFORMED = 1  # not msgpack, wrong envelope, wrong field types or ranges
    TOO_LARGE = 2  # larger than the receiver's max_bytes
    UNSUPPORTED_VERSION = 3
    UNKNOWN_TYPE = 4
    INCOMPATIBLE = 5  # compatibility hash differs: the KV caches cannot be exchanged
    INTERNAL = 6  # the receiver failed while handling a valid message
    UNKNOWN_REQUEST = 7  # the request id names no request the receiver holds
    UNAVAILABLE = 8  # the receiver cannot take work now (draining, overloaded)
    DEADLINE_EXCEEDED = 9


class SignalError(FabricError):
    """An error with an ``ErrorCode``: everything ``decode`` raises, and ``RemoteError``."""

    code: ClassVar[ErrorCode]


class MalformedMessage(SignalError, InvalidInput):
    """A message is not well-formed or a field has the wrong type or range."""

    code = ErrorCode.MALFORMED


class MessageTooLarge(MalformedMessage):
    """A payload exceeds the receiver's size limit."""

    code = ErrorCode.TOO_LARGE


class UnsupportedVersion(SignalError, ProtocolMismatch):
    """A payload was written by another protocol version."""

    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownMessageType(SignalError, ProtocolMismatch):
    """A payload names a message type this version does not know."""

    code = ErrorCode.UNKNOWN_TYPE


class IncompatiblePeer(SignalError, ProtocolMismatch):
    """A payload's compatibility hash differs from the receiver's (model, dtype, layout...)."""

    code = ErrorCode.INCOMPATIBLE


class RemoteError(SignalError):
    """The peer failed while handling a valid message (``ErrorCode.INTERNAL``)."""

    code = ErrorCode.INTERNAL


# The exception a client raises for an ErrorReply of each code (``client.error_from_reply``).
ERROR_CODE_TO_EXCEPTION: dict[ErrorCode, type[FabricError]] = {
    ErrorCode.MALFORMED: MalformedMessage,
    ErrorCode.TOO_LARGE: MessageTooLarge,
    ErrorCode.UNSUPPORTED_VERSION: UnsupportedVersion,
    ErrorCode.UNKNOWN_TYPE: UnknownMessageType,
    ErrorCode.INCOMPATIBLE: IncompatiblePeer,
    ErrorCode.INTERNAL: RemoteError,
    ErrorCode.UNKNOWN_REQUEST: InvalidInput,
    ErrorCode.UNAVAILABLE: PeerUnavailable,
    ErrorCode.DEADLINE_EXCEEDED: TransferTimeout,
}
