"""Handoff signals: small versioned control messages between prefill and decode workers.

``messages`` owns the message types and their msgpack wire codec; ``errors`` the ``ErrorCode``
vocabulary and the exceptions a refused message raises; ``framing`` the correlation-id frames and
peer identities the ZeroMQ channel adds; ``server`` (``SignalServer``) and ``client``
(``SignalClient``, ``error_from_reply``) the two ends of that channel; ``liveness`` the bounded
last-seen table; ``metrics`` the process's signal error counters (``REGISTRY``); ``kv_trace``
the compact form of a request's KV trace in ``TokenChunk.stats``. KV bytes never travel here
(NIXL moves them). Imports only ``fabric.errors`` (and ``fabric.auth``, msgpack, ZeroMQ,
prometheus_client; never ``kvbm`` or ``transfer``). Inside the package imports point one way:
``errors``, ``framing``, ``liveness`` and ``kv_trace`` import no other signal module,
``messages`` and ``metrics`` import ``errors``, and ``client`` and ``server`` import the rest.
"""

from __future__ import annotations

from fabric.signal.client import SignalClient, error_from_reply
from fabric.signal.errors import (
    ERROR_CODE_TO_EXCEPTION,
    ErrorCode,
    IncompatiblePeer,
    MalformedMessage,
    MessageTooLarge,
    RemoteError,
    SignalError,
    UnknownMessageType,
    UnsupportedVersion,
)
from fabric.signal.framing import PeerId
from fabric.signal.messages import (
    DEFAULT_MAX_BYTES,
    MAX_SAMPLING_ENTRIES,
    PROTOCOL_VERSION,
    Abort,
    BlocksReady,
    ErrorReply,
    GenerateRequest,
    Heartbeat,
    Message,
    MessageType,
    PrefillRequest,
    TokenChunk,
    TransferDone,
    decode,
    encode,
)
from fabric.signal.server import Handler, SignalServer

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_SAMPLING_ENTRIES",
    "ERROR_CODE_TO_EXCEPTION",
    "PROTOCOL_VERSION",
    "Abort",
    "BlocksReady",
    "ErrorCode",
    "ErrorReply",
    "GenerateRequest",
    "Handler",
    "Heartbeat",
    "IncompatiblePeer",
    "MalformedMessage",
    "Message",
    "MessageTooLarge",
    "MessageType",
    "PeerId",
    "PrefillRequest",
    "RemoteError",
    "SignalClient",
    "SignalError",
    "SignalServer",
    "TokenChunk",
    "TransferDone",
    "UnknownMessageType",
    "UnsupportedVersion",
    "decode",
    "encode",
    "error_from_reply",
]
