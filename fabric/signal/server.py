"""``SignalServer``: a ZeroMQ ROUTER bound to an endpoint, served by one background thread.

Owns the server side of the signal channel: binding, the serving thread, refusals, heartbeat
answers, pushes to clients and a bounded close. Frames are ``framing``'s, payloads ``messages``'.
Imports only ``fabric.errors``, ``fabric.auth`` and ``fabric.signal``. With
``FABRIC_CURVE_KEY_FILE`` set the ROUTER is a CURVE server (``fabric.auth``): clients without the
deployment's key never reach the handler.

Behaviour:

* Every incoming message is decoded with the server's compatibility hash and size limit. A
  malformed, oversized, unknown-type, other-version or incompatible message is answered with an
  ``ErrorReply`` whose code is the decode error's (``MALFORMED``, ``TOO_LARGE``, ``UNKNOWN_TYPE``,
  ``UNSUPPORTED_VERSION``, ``INCOMPATIBLE``) and logged at WARNING; serving continues. ZMQ's
  ``MAXMSGSIZE`` (4x ``max_bytes``) disconnects a peer that sends something absurdly large before
  it is buffered.
* ``Heartbeat`` is answered by the server itself (same ``seq``, the server's wall clock) and never
  reaches the handler. Any message refreshes ``last_seen(peer)``: that and ``SignalClient.ping``
  (an RTT) are the liveness pattern; a worker pings its peers every few seconds and treats a
  peer unseen for a few periods as gone. The table is bounded (``liveness.LastSeenTable``): a
  peer unseen for ``last_seen_horizon_s`` is forgotten, and at most ``max_tracked_peers`` are kept.
* The handler's return value is the reply; None sends nothing. A request (``corr != 0``) whose
  handler returns None, or raises, is answered ``ErrorReply(INTERNAL)`` (so ``request`` never waits
  for nothing); exceptions are logged at WARNING with their traceback. Serving continues.

Threads (ZMQ sockets are not thread-safe): the ROUTER is created, used and closed by the server
thread only; the handler runs on that thread. ``send`` may be called from any thread: it queues the
frame for the server thread (a socketpair wakes it) and waits, bounded, for the outcome. Sockets
share ``zmq.Context.instance()`` unless a context is passed in. ``close`` returns within
``close_timeout_s`` with the TCP port free again: ZMQ closes listeners asynchronously, so it waits
(bounded) until the port can be bound.

Latency (2 cores, tcp loopback, a ``TransferDone`` request, 5 000 round trips, busy host; quick
timeit, not a test): p50 70-135 us with the server thread in the client's process or in another
one, p99 about 150-270 us; raw pyzmq ROUTER/DEALER echo in the same runs 40-110 us p50
(ENVIRONMENT.md: 100-150 us on tcp). The 30-40 us difference is the codec and validation on both
ends (about 15 us) plus the server's poll loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeAlias

import zmq

import fabric.signal.metrics as signal_metrics
from fabric.auth import keys_from_env, secure_server
from fabric.errors import ConfigError, InvalidTransition, PeerUnavailable, TransferTimeout
from fabric.signal.errors import ErrorCode, MalformedMessage, SignalError
from fabric.signal.framing import CORR_BYTES, ONE_WAY, PeerId, identity_bytes, peer_id, wall_ms
from fabric.signal.liveness import DEFAULT_HORIZON_S, DEFAULT_MAX_PEERS, LastSeenTable
from fabric.signal.messages import DEFAULT_MAX_BYTES, ErrorReply, Heartbeat, Message, decode, encode
from fabric.signal.metrics import Side, SignalErrorKind

logger = logging.getLogger(__name__)

Handler: TypeAlias = Callable[[Message, PeerId], Message | None]

_POLL_INTERVAL_MS = 100
_MAX_BATCH = 256  # messages served per poll before queued sends get their turn


class SignalServer:
    """A ROUTER socket bound to ``endpoint``, served by a background thread (see module doc)."""

    def __init__(
        self,
        endpoint: str,
        handler: Handler,
        *,
        compat_hash: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        name: str = "signal-server",
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        send_timeout_s: float = 2.0,
        close_timeout_s: float = 2.0,
        last_seen_horizon_s: float = DEFAULT_HORIZON_S,
        max_tracked_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        """Bind the ROUTER and start the server thread.

        Args:
            endpoint: address to bind, e.g. ``tcp://127.0.0.1:0`` (port 0 picks a free one).
            handler: called on the server thread for every valid non-heartbeat message.
            compat_hash: this worker's KV compatibility hash; other hashes are refused.
            name: names the thread, the log lines and the server's heartbeat replies.
            send_timeout_s: how long ``send`` waits for the server thread.
            close_timeout_s: how long ``close`` waits for the thread and the port.
            last_seen_horizon_s: ``last_seen`` forgets a peer silent for longer than this.
            max_tracked_peers: the most peers ``last_seen`` remembers (least recent go first).

        Raises:
            ConfigError: the endpoint cannot be bound, ``name`` is empty, or the last-seen
                bounds are not positive.
        """
        if not name:
            raise ConfigError("SignalServer name must not be empty (it signs heartbeat replies)")
        self._handler = handler
        self._compat_hash = compat_hash
        self._max_bytes = max_bytes
        self._name = name
        self._send_timeout_s = send_timeout_s
        self._close_timeout_s = close_timeout_s
        self._lock = threading.Lock()
        self._outbox: deque[tuple[bytes, bytes, Future[None]]] = deque()
        self._closing = False  # no more sends accepted (set by close() or a dying thread)
        self._closed = False  # thread joined, socket closed, port free
        # Written by the server thread only; read by last_seen() from any thread.
        self._last_seen = LastSeenTable(horizon_s=last_seen_horizon_s, max_peers=max_tracked_peers)

        ctx = context if context is not None else zmq.Context.instance()
        self._router = ctx.socket(zmq.ROUTER)
        self._wake_recv, self._wake_send = socket.socketpair()
        try:
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> EHOSTUNREACH
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over
            self._router.setsockopt(zmq.MAXMSGSIZE, 4 * max_bytes)
            secure_server(self._router, keys_from_env())  # CURVE when the deployment has keys
            self._router.bind(endpoint)
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            self._wake_recv.close()
            self._wake_send.close()
            raise ConfigError(
                f"{name}: cannot bind signal endpoint {endpoint!r}: {exc}; use a free port (or 0)"
            ) from exc
        self._endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        logger.info("%s: serving signals on %s", name, self._endpoint)

    @property
    def endpoint(self) -> str:
        """The bound endpoint (the real port when 0 was asked for)."""
        return self._endpoint

    @property
    def num_tracked_peers(self) -> int:
        """How many peers ``last_seen`` remembers (bounded by ``max_tracked_peers``)."""
        return len(self._last_seen)

    def last_seen(self, peer: str) -> float | None:
        """``time.monotonic()`` when ``peer`` last sent anything.

        Returns:
            None if it never did, or not within ``last_seen_horizon_s``, or it was evicted by the
            ``max_tracked_peers`` cap.
        """
        return self._last_seen.get(peer, time.monotonic())

    def send(self, peer: str, message: Message) -> None:
        """Push ``message`` to the connected client whose identity is ``peer`` (one-way).

        Safe from any thread, including the handler's.

        Raises:
            InvalidInput: ``peer`` cannot be encoded as a ZMQ identity (a lone surrogate).
            PeerUnavailable: no client with that identity is connected, or it is not reading.
            TransferTimeout: the server thread did not get to it within ``send_timeout_s``.
            InvalidTransition: the server was closed.
        """
        self.send_all(peer, (message,))

    def send_all(self, peer: str, messages: Sequence[Message]) -> None:
        """Push ``messages`` to ``peer`` in order, in one wake-up of the server thread (one
        hand-over instead of one per message; a client reading them finds them together).

        Raises:
            As ``send``: the first message's failure (each is sent on its own, in order).
        """
        payloads = [encode(message, self._compat_hash) for message in messages]
        identity = identity_bytes(peer)
        if threading.current_thread() is self._thread:
            for payload in payloads:
                self._send_now(identity, ONE_WAY, payload)
            return
        dones: list[Future[None]] = [Future() for _ in payloads]
        with self._lock:
            if self._closing:
                raise InvalidTransition(f"{self._name}: send() after close()")
            self._outbox.extend(zip([identity] * len(payloads), payloads, dones, strict=True))
        self._wake()
        deadline = time.monotonic() + self._send_timeout_s
        for message, done in zip(messages, dones, strict=True):
            try:
                done.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout as exc:
                signal_metrics.record(Side.SERVER, SignalErrorKind.TIMEOUT)
                raise TransferTimeout(
                    f"{self._name}: the server thread did not send {type(message).__name__} to "
                    f"{peer!r} within {self._send_timeout_s} s"
                ) from exc

    def close(self) -> None:
        """Stop the thread, close the socket and wait until the port is free (both bounded).

        Idempotent.
        """
        if self._closed:
            return
        deadline = time.monotonic() + self._close_timeout_s
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join(self._close_timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "%s: server thread still running after %.1f s (a handler is stuck?); its socket "
                "closes when it returns",
                self._name,
                self._close_timeout_s,
            )
            return
        self._closed = True
        self._wake_send.close()
        _await_tcp_port_free(self._endpoint, deadline)

    def __enter__(self) -> SignalServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Server thread
    # -----------------------------------------------------------------------------------------

    def _wake(self) -> None:
        # Full: a wake-up byte is already waiting. Closed: the thread is gone.
        with contextlib.suppress(OSError):
            self._wake_send.send(b"\0")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(_POLL_INTERVAL_MS))
                if self._wake_recv.fileno() in ready:  # plain sockets poll by fd
                    with contextlib.suppress(BlockingIOError):
                        while self._wake_recv.recv(4096):
                            pass
                with self._lock:
                    outbox, self._outbox = self._outbox, deque()
                    closing = self._closing
                for identity, payload, done in outbox:
                    try:
                        self._send_now(identity, ONE_WAY, payload)
                        done.set_result(None)
                    except PeerUnavailable as exc:
                        done.set_exception(exc)
                if closing:
                    return
                self._last_seen.prune(time.monotonic())
                if self._router in ready:
                    self._serve_batch()
        except Exception:
            logger.exception("%s: server thread failed; no more signals are served", self._name)
        finally:
            self._router.close(linger=0)
            self._wake_recv.close()
            with self._lock:
                self._closing = True
                outbox, self._outbox = self._outbox, deque()
            for _, _, done in outbox:
                done.set_exception(PeerUnavailable(f"{self._name} closed before sending"))

    def _send_now(self, identity: bytes, corr: bytes, payload: bytes) -> None:
        try:
            self._router.send_multipart((identity, corr, payload), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            signal_metrics.record(Side.SERVER, SignalErrorKind.CONNECTION_LOST)
            reason = "not connected" if exc.errno == zmq.EHOSTUNREACH else "not reading"
            raise PeerUnavailable(
                f"{self._name}: peer {peer_id(identity)!r} is {reason} ({exc})"
            ) from exc

    def _serve_batch(self) -> None:
        for _ in range(_MAX_BATCH):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, corr, reply = frames[0], ONE_WAY, None
            if len(frames) == 3 and len(frames[1]) == CORR_BYTES:
                corr = frames[1]
                reply = self._serve(peer_id(identity), corr, frames[2])
            else:
                reply = self._refuse(
                    peer_id(identity),
                    MalformedMessage(
                        f"expected frames [corr (8 bytes), payload], got {len(frames) - 1} "
                        f"frames of {[len(frame) for frame in frames[1:]]} bytes"
                    ),
                )
            if reply is not None:
                try:
                    self._send_now(identity, corr, encode(reply, self._compat_hash))
                except PeerUnavailable as exc:
                    logger.warning("%s: reply dropped: %s", self._name, exc)

    def _serve(self, peer: PeerId, corr: bytes, payload: bytes) -> Message | None:
        self._last_seen.touch(peer, time.monotonic())
        try:
            message = decode(payload, expected_compat=self._compat_hash, max_bytes=self._max_bytes)
        except SignalError as exc:
            return self._refuse(peer, exc)
        is_request = corr != ONE_WAY
        logger.debug(
            "%s: %s %s from %r (corr %s)",
            self._name,
            type(message).__name__,
            getattr(message, "request_id", ""),
            peer,
            corr.hex(),
        )
        if isinstance(message, Heartbeat):
            return Heartbeat(self._name, message.seq, wall_ms()) if is_request else None
        request_id = getattr(message, "request_id", None)
        try:
            reply = self._handler(message, peer)
        except Exception as exc:
            what = f"{type(message).__name__} from {peer!r}"
            signal_metrics.record(Side.SERVER, SignalErrorKind.HANDLER_FAILED)
            logger.warning("%s: handler failed on %s", self._name, what, exc_info=True)
            return ErrorReply(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if reply is None and not is_request:
            return None
        if not isinstance(reply, Message):  # None for a request, or a handler bug
            what = f"{type(message).__name__} from {peer!r}"
            signal_metrics.record(Side.SERVER, SignalErrorKind.HANDLER_FAILED)
            logger.warning("%s: handler returned %r to %s", self._name, reply, what)
            return ErrorReply(
                request_id,
                ErrorCode.INTERNAL,
                f"{self._name} has no reply to {type(message).__name__} (the handler returned "
                f"{type(reply).__name__}); send it one-way if it needs none",
            )
        return reply

    def _refuse(self, peer: PeerId, exc: SignalError) -> ErrorReply:
        signal_metrics.record_unreadable(Side.SERVER, exc.code)
        logger.warning(
            "%s: refused a message from %r (%s): %s", self._name, peer, exc.code.name, exc
        )
        return ErrorReply(None, exc.code, str(exc))


def _await_tcp_port_free(endpoint: str, deadline: float) -> None:
    """Wait until the listener of a ``tcp://host:port`` endpoint is gone (or the deadline)."""
    if not endpoint.startswith("tcp://"):
        return
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a scoped IPv6 address: nothing portable to probe
        return
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZMQ binds
            try:
                probe.bind((host, int(port)))
            except OSError:
                if time.monotonic() >= deadline:
                    logger.warning("port of %s still bound after close()", endpoint)
                    return
                time.sleep(0.001)
            else:
                return
