"""``SignalClient``: a ZeroMQ DEALER whose identity is its worker id, talking to a ``SignalServer``.

Owns the client side of the signal channel: requests with a bounded wait, one-way sends, server
pushes and heartbeats (``ping``). Frames are ``framing``'s, payloads ``messages``'. Imports only
``fabric.errors`` and ``fabric.signal``.

Remote errors: ``request`` raises ``error_from_reply``: the exception ``ERROR_CODE_TO_EXCEPTION``
gives for an ``ErrorReply``'s code (``IncompatiblePeer`` for ``INCOMPATIBLE``, ``RemoteError`` for
``INTERNAL``, ``MalformedMessage`` for ``MALFORMED``...), its text naming the server, the code and
the remote message. ``receive`` returns ``ErrorReply`` pushes as values.

Pushes (one-way messages from the server) that arrive while ``request`` waits for its reply are
kept, still encoded, for ``receive``, oldest first. At most ``max_pending_pushes`` are kept: when
the buffer is full the oldest is dropped, logged at WARNING and counted in
``num_dropped_pushes``, so a client that never calls ``receive`` cannot grow without bound.

Threads: each ``SignalClient`` belongs to one owner thread, which makes every call on it (ZMQ
sockets are not thread-safe). Sockets share ``zmq.Context.instance()`` unless a context is passed
in.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

import zmq

import fabric.signal.metrics as signal_metrics
from fabric.auth import keys_from_env, secure_client
from fabric.errors import (
    ConfigError,
    FabricError,
    InvalidTransition,
    PeerUnavailable,
    TransferTimeout,
)
from fabric.signal.errors import ERROR_CODE_TO_EXCEPTION, SignalError
from fabric.signal.framing import (
    CORR_BYTES,
    ONE_WAY,
    client_identity_bytes,
    corr_frame,
    wall_ms,
)
from fabric.signal.messages import DEFAULT_MAX_BYTES, ErrorReply, Heartbeat, Message, decode, encode
from fabric.signal.metrics import Side, SignalErrorKind

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_PUSHES = 1024


class SignalClient:
    """A DEALER connected to a ``SignalServer``, identified by ``identity`` (see module doc).

    Owned by one thread: every call comes from it.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        identity: str,
        compat_hash: int,
        timeout_s: float = 5.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        max_pending_pushes: int = DEFAULT_MAX_PENDING_PUSHES,
    ) -> None:
        """Connect (ZMQ connects lazily: a server may start later).

        Args:
            identity: this worker's id; the server addresses pushes to it. Unique per server:
                a second client with the same identity takes the connection over.
            timeout_s: default wait of ``request`` and ``ping``.
            max_pending_pushes: the most pushes kept while ``request`` waits (oldest dropped).

        Raises:
            InvalidInput: the identity is not valid UTF-8 text (a lone surrogate), is empty,
                starts with NUL or exceeds 255 UTF-8 bytes.
            ConfigError: ``max_pending_pushes`` is below 1.
        """
        raw_identity = client_identity_bytes(identity)
        if max_pending_pushes < 1:
            raise ConfigError(
                f"{identity}: max_pending_pushes must be at least 1, got {max_pending_pushes}"
            )
        self._endpoint = endpoint
        self._identity = identity
        self._compat_hash = compat_hash
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._next_corr = itertools.count(1)
        self._next_ping_seq = itertools.count()
        # One-way payloads seen while waiting for a reply, oldest first; never above the cap.
        self._pushes: deque[bytes] = deque()
        self._max_pending_pushes = max_pending_pushes
        self._num_dropped_pushes = 0
        ctx = context if context is not None else zmq.Context.instance()
        self._dealer = ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.setsockopt(zmq.IDENTITY, raw_identity)
        secure_client(self._dealer, keys_from_env())  # CURVE when the deployment has keys
        self._dealer.connect(endpoint)

    @property
    def identity(self) -> str:
        """The identity the server knows this client by."""
        return self._identity

    @property
    def num_pending_pushes(self) -> int:
        """Pushes buffered by ``request`` that ``receive`` has not returned yet."""
        return len(self._pushes)

    @property
    def num_dropped_pushes(self) -> int:
        """Pushes dropped, oldest first, because ``max_pending_pushes`` were already buffered."""
        return self._num_dropped_pushes

    def request(self, message: Message, timeout_s: float | None = None) -> Message:
        """Send ``message`` and wait for its reply.

        Raises:
            TransferTimeout: no reply within ``timeout_s`` (default: the client's).
            FabricError: the reply is an ``ErrorReply`` (class by ``ERROR_CODE_TO_EXCEPTION``),
                or cannot be decoded (``MalformedMessage`` / ``ProtocolMismatch``).
            PeerUnavailable: the send queue is full.
        """
        wait_s = self._timeout_s if timeout_s is None else timeout_s
        corr = corr_frame(next(self._next_corr))
        self._send(corr, message)
        deadline = time.monotonic() + wait_s
        while (frames := self._recv_frames(deadline)) is not None:
            if frames[0] == corr:
                reply = self._decode(frames[1])
                if isinstance(reply, ErrorReply):
                    signal_metrics.record(Side.CLIENT, SignalErrorKind.REMOTE_ERROR)
                    raise error_from_reply(reply, peer=self._endpoint)
                return reply
            if frames[0] == ONE_WAY:
                self._buffer_push(frames[1])
            else:
                logger.debug("%s: dropped a late reply (corr %s)", self._identity, frames[0].hex())
        signal_metrics.record(Side.CLIENT, SignalErrorKind.TIMEOUT)
        raise TransferTimeout(
            f"{self._identity}: no reply from {self._endpoint} to {type(message).__name__} "
            f"within {wait_s} s; is the server running and reachable?"
        )

    def send(self, message: Message) -> None:
        """Send ``message`` one-way; anything the server answers arrives through ``receive``.

        Raises:
            PeerUnavailable: the send queue is full.
        """
        self._send(ONE_WAY, message)

    def receive(self, timeout_s: float) -> Message | None:
        """The next one-way message from the server (an ``ErrorReply`` is returned, not raised).

        Returns:
            The message, or None when none arrived within ``timeout_s``.

        Raises:
            MalformedMessage, ProtocolMismatch: the message could not be decoded (it is dropped).
        """
        if self._pushes:
            return self._decode(self._pushes.popleft())
        deadline = time.monotonic() + timeout_s
        while (frames := self._recv_frames(deadline)) is not None:
            if frames[0] == ONE_WAY:
                return self._decode(frames[1])
            logger.debug("%s: dropped a late reply (corr %s)", self._identity, frames[0].hex())
        return None

    def ping(self, timeout_s: float | None = None) -> float:
        """Send a ``Heartbeat`` request and return the round-trip time in seconds.

        Raises:
            TransferTimeout: the server did not answer in time (treat it as possibly gone).
        """
        start = time.perf_counter()
        self.request(Heartbeat(self._identity, next(self._next_ping_seq), wall_ms()), timeout_s)
        return time.perf_counter() - start

    def close(self) -> None:
        """Close the socket without lingering. Idempotent."""
        self._dealer.close(linger=0)

    def __enter__(self) -> SignalClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _buffer_push(self, payload: bytes) -> None:
        if len(self._pushes) >= self._max_pending_pushes:
            self._pushes.popleft()
            self._num_dropped_pushes += 1
            logger.warning(
                "%s: push buffer full (%d pushes from %s arrived during request()); dropped the "
                "oldest (%d so far); call receive() more often or raise max_pending_pushes",
                self._identity,
                self._max_pending_pushes,
                self._endpoint,
                self._num_dropped_pushes,
            )
        self._pushes.append(payload)

    def _send(self, corr: bytes, message: Message) -> None:
        if self._dealer.closed:
            raise InvalidTransition(f"{self._identity}: signal client used after close()")
        payload = encode(message, self._compat_hash)
        logger.debug(
            "%s: %s %s to %s (corr %s)",
            self._identity,
            type(message).__name__,
            getattr(message, "request_id", ""),
            self._endpoint,
            corr.hex(),
        )
        try:
            self._dealer.send_multipart((corr, payload), zmq.NOBLOCK)
        except zmq.Again as exc:
            signal_metrics.record(Side.CLIENT, SignalErrorKind.CONNECTION_LOST)
            raise PeerUnavailable(
                f"{self._identity}: send queue to {self._endpoint} is full; the server is not "
                "reading"
            ) from exc

    def _recv_frames(self, deadline: float) -> tuple[bytes, bytes] | None:
        """The next well-framed ``(corr, payload)``, or None at the deadline."""
        if self._dealer.closed:
            raise InvalidTransition(f"{self._identity}: signal client used after close()")
        while (remaining_ms := (deadline - time.monotonic()) * 1000) > 0:
            if not self._dealer.poll(max(1, int(remaining_ms))):
                continue
            frames = self._dealer.recv_multipart()
            if len(frames) == 2 and len(frames[0]) == CORR_BYTES:
                return frames[0], frames[1]
            signal_metrics.record(Side.CLIENT, SignalErrorKind.MALFORMED)
            logger.warning(
                "%s: dropped a badly framed message (%d frames)", self._identity, len(frames)
            )
        return None

    def _decode(self, payload: bytes) -> Message:
        try:
            return decode(payload, expected_compat=self._compat_hash, max_bytes=self._max_bytes)
        except SignalError as exc:
            signal_metrics.record_unreadable(Side.CLIENT, exc.code)
            raise


def error_from_reply(reply: ErrorReply, *, peer: str) -> FabricError:
    """The exception that stands for ``reply`` (``ERROR_CODE_TO_EXCEPTION``), ready to raise."""
    about = f" about request {reply.request_id!r}" if reply.request_id is not None else ""
    return ERROR_CODE_TO_EXCEPTION[reply.code](
        f"{peer} answered {reply.code.name}{about}: {reply.message}"
    )
