"""ZeroMQ framing of signal messages: correlation ids and peer identities.

Owns the frame layout ``SignalServer`` and ``SignalClient`` share, the mapping between ZMQ
identities (bytes) and ``PeerId`` (str), and the clock that stamps heartbeats. Messages are
``fabric.signal.messages``' msgpack payloads; this module adds only the frames around them.
Imports only ``fabric.errors`` and the stdlib.

Framing (a contract, like the message layout)::

    client -> server   [corr: 8-byte big-endian uint64, payload]
    server -> client   [corr, payload]          (the ROUTER adds / strips the identity frame)

``corr`` is a correlation id: ``SignalClient.request`` draws a fresh non-zero one per call and the
server answers with the same value, so a late reply to a timed-out request is recognised and
dropped, never returned for a later request. ``corr == 0`` (``ONE_WAY``) marks a one-way message:
``send`` on either side. Whatever the server answers to a one-way message (a handler's reply, an
``ErrorReply`` for a bad message) travels with ``corr == 0`` too and reaches the client through
``receive``.

Identities: a ``SignalClient``'s ZMQ identity is its worker id in strict UTF-8, 1..255 bytes, not
starting with NUL (ZMQ reserves those). A foreign DEALER may use any bytes; the server names it by
``peer_id`` (non-UTF-8 bytes map to lone surrogates through ``surrogateescape``), and
``identity_bytes`` maps such a name back, so ``SignalServer.send`` can still address it.
"""

from __future__ import annotations

import time
from typing import NewType

from fabric.errors import InvalidInput

PeerId = NewType("PeerId", str)
"""A client's ZMQ identity: its worker id (bytes that are not UTF-8 map through surrogateescape)."""

CORR_BYTES = 8
ONE_WAY = bytes(CORR_BYTES)
"""The correlation id of a one-way message."""
MAX_IDENTITY_BYTES = 255


def corr_frame(corr: int) -> bytes:
    """The correlation frame of request number ``corr`` (non-zero: zero is ``ONE_WAY``)."""
    return corr.to_bytes(CORR_BYTES, "big")


def peer_id(identity: bytes) -> PeerId:
    """The ``PeerId`` of a ZMQ identity frame (never fails: non-UTF-8 bytes are escaped)."""
    return PeerId(identity.decode("utf-8", "surrogateescape"))


def identity_bytes(peer: str) -> bytes:
    """The ZMQ identity of ``peer``, the inverse of ``peer_id``.

    Raises:
        InvalidInput: ``peer`` holds a lone surrogate that stands for no byte (outside
            U+DC80..U+DCFF), so no identity can carry it.
    """
    try:
        return peer.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"peer identity {peer!r} cannot be encoded as UTF-8 ({exc.reason} at position "
            f"{exc.start}); use a worker id of valid Unicode text"
        ) from exc


def client_identity_bytes(identity: str) -> bytes:
    """The ZMQ identity of a ``SignalClient``: strict UTF-8, 1..255 bytes, no leading NUL.

    Strict because the identity is also the ``worker_id`` of the client's heartbeats, which the
    codec writes as msgpack str (UTF-8).

    Raises:
        InvalidInput: the identity holds a lone surrogate, is empty, starts with NUL or is too
            long.
    """
    try:
        raw = identity.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"client identity {identity!r} cannot be encoded as UTF-8 ({exc.reason} at position "
            f"{exc.start}); use a worker id of valid Unicode text"
        ) from exc
    if not raw or raw[0] == 0 or len(raw) > MAX_IDENTITY_BYTES:
        raise InvalidInput(
            f"client identity {identity!r} must be 1..{MAX_IDENTITY_BYTES} bytes and not "
            "start with NUL (ZMQ reserves those)"
        )
    return raw


def wall_ms() -> int:
    """The wall clock in ms since the Unix epoch (heartbeats' ``sent_at_ms``)."""
    return time.time_ns() // 1_000_000
