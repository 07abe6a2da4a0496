"""The decode side's prefills in flight: ask a prefill worker for a prefill, collect the outcome.

Owns the table of prefills in flight; the links to prefill workers (one ``SignalClient`` each,
identity: this decode worker's id) are ``fabric.pd.ProducerLinks``'. Everything here runs on the
scheduler thread, which owns the sockets.

Wire exchange (worker to worker; the frontend never sees it)::

    decode                                     prefill
      PrefillRequest (one-way) ───────────────▶ queued, computed, offered
      ◀──────── KvStream, KvLayers...           a layer-wise handoff only (RemoteProgress)
      ◀──────── TokenChunk([first], stats)      the prefill's own stats (computed, cached, ms)
      ◀──────── BlocksReady                     (or ErrorReply(request_id, ...) on failure)
      TransferDone / Abort (one-way) ─────────▶ release

A prefill in flight fails (``RemoteFailed``) when the prefill worker is not in the directory or
has another compatibility hash, the send fails, it answers ``ErrorReply``, it leaves the
directory (its lease expired: it died) or no ``BlocksReady`` arrives before the deadline. A failed
or abandoned prefill is told ``Abort`` so it releases at once (its handoff expiry is the backstop);
a ``BlocksReady`` for a request no longer in flight is answered ``Abort`` too.

Cost: a ``SignalClient`` waits at least 1 ms in ``receive`` when nothing is there, so ``poll``
costs about 1 ms per prefill worker with prefills in flight (and nothing otherwise).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fabric.discovery.registration import WorkerDirectory
from fabric.errors import FabricError
from fabric.pd import ProducerLinks
from fabric.signal.messages import (
    Abort,
    BlocksReady,
    ErrorReply,
    KvLayers,
    KvStream,
    Message,
    PrefillRequest,
    TokenChunk,
    TransferDone,
)
from fabric.worker.request import StatValue

logger = logging.getLogger(__name__)

_FOLLOW_UP_S = 0.01
_MIN_WAIT_S = 0.001


@dataclass(frozen=True, slots=True)
class RemoteReady:
    """The prefill worker offered the request's blocks."""

    request_id: str
    worker_id: str
    ready: BlocksReady
    stats: dict[str, StatValue]
    """The prefill worker's stats (``computed_tokens``, ``cached_tokens``, ``prefill_ms``)."""


@dataclass(frozen=True, slots=True)
class RemoteFailed:
    """The prefill worker will not deliver; ``reason`` says why."""

    request_id: str
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RemoteProgress:
    """A layer-wise handoff's news, before its ``RemoteReady``: the ``KvStream`` that opens it
    or a ``KvLayers`` frontier."""

    request_id: str
    worker_id: str
    message: KvStream | KvLayers


RemoteOutcome = RemoteReady | RemoteFailed | RemoteProgress


@dataclass(slots=True)
class _InFlight:
    worker_id: str
    deadline: float
    stats: dict[str, StatValue] = field(default_factory=dict)


class RemotePrefills:
    """Prefills this decode worker asked prefill workers for (see the module docstring)."""

    def __init__(
        self,
        directory: WorkerDirectory,
        *,
        identity: str,
        compat_hash: int,
        timeout_s: float,
    ) -> None:
        self._links = ProducerLinks(directory, identity=identity, compat_hash=compat_hash)
        self.timeout_s = timeout_s
        self._in_flight: dict[str, _InFlight] = {}

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def start(self, request: PrefillRequest, worker_id: str) -> str | None:
        """Send ``request`` to ``worker_id``; None when sent, else why it could not be."""
        try:
            link = self._links.link(worker_id)
        except FabricError as exc:  # not registered, not a KV source, incompatible
            return str(exc)
        try:
            link.send(request)
        except FabricError as exc:
            self._links.drop(worker_id)
            return f"cannot reach prefill worker {worker_id!r}: {exc}"
        deadline = time.monotonic() + self.timeout_s
        self._in_flight[request.request_id] = _InFlight(worker_id, deadline)
        return None

    def poll(self, timeout_s: float) -> list[RemoteOutcome]:
        """Outcomes that arrived (waiting up to ``timeout_s``, at least 1 ms, per worker with
        prefills in flight; one outcome per worker per call), then the failures (deadline
        passed, worker gone)."""
        outcomes: list[RemoteOutcome] = []
        timeout_s = max(timeout_s, _MIN_WAIT_S)  # a SignalClient does not look for less
        for worker_id in {f.worker_id for f in self._in_flight.values()}:
            message = self._links.receive(worker_id, timeout_s)
            while message is not None:
                outcome = self._on_message(worker_id, message)
                if outcome is not None:
                    outcomes.append(outcome)
                if isinstance(message, TokenChunk):
                    # The stats chunk comes right before its BlocksReady: take that too.
                    message = self._links.receive(worker_id, _FOLLOW_UP_S)
                elif isinstance(message, KvStream | KvLayers):  # take every frontier queued
                    message = self._links.receive(worker_id, _MIN_WAIT_S)
                else:
                    break
        now = time.monotonic()
        for request_id, flight in list(self._in_flight.items()):
            reason = None
            if not self._links.is_registered(flight.worker_id):
                reason = f"prefill worker {flight.worker_id!r} left the directory (it died?)"
            elif now >= flight.deadline:
                reason = f"no blocks from prefill worker {flight.worker_id!r} in {self.timeout_s} s"
            if reason is not None:
                self.abort(request_id, reason)
                outcomes.append(RemoteFailed(request_id, flight.worker_id, reason))
        return outcomes

    def done(self, ready: RemoteReady, num_blocks: int) -> None:
        """Tell the prefill worker its blocks were read (it releases them)."""
        self._links.send(ready.worker_id, TransferDone(ready.request_id, num_blocks))

    def abort(self, request_id: str, reason: str, worker_id: str | None = None) -> None:
        """Forget ``request_id`` and tell its prefill worker to release what it holds."""
        flight = self._in_flight.pop(request_id, None)
        target = flight.worker_id if flight is not None else worker_id
        if target is not None:
            self._links.send(target, Abort(request_id, reason))

    def close(self) -> None:
        """Abort every prefill in flight and close the clients (idempotent)."""
        for request_id in list(self._in_flight):
            self.abort(request_id, "decode worker shutting down")
        self._links.close()

    # -- internals -----------------------------------------------------------------------------

    def _on_message(self, worker_id: str, message: Message) -> RemoteOutcome | None:
        request_id = getattr(message, "request_id", None)
        flight = self._in_flight.get(request_id) if isinstance(request_id, str) else None
        if isinstance(message, TokenChunk) and flight is not None:
            flight.stats = dict(message.stats)
        elif isinstance(message, KvStream | KvLayers):
            if flight is not None:
                return RemoteProgress(message.request_id, worker_id, message)
            if isinstance(message, KvStream):  # nobody will read it: release at once
                self._links.send(
                    worker_id, Abort(message.request_id, "request no longer in flight")
                )
        elif isinstance(message, BlocksReady):
            if flight is None:
                logger.debug("late BlocksReady for %s from %s: aborting", request_id, worker_id)
                self._links.send(
                    worker_id, Abort(message.request_id, "request no longer in flight")
                )
                return None
            del self._in_flight[message.request_id]
            return RemoteReady(message.request_id, worker_id, message, flight.stats)
        elif isinstance(message, ErrorReply) and flight is not None:
            assert request_id is not None
            del self._in_flight[request_id]
            reason = f"prefill worker {worker_id!r} refused: {message.code.name}: {message.message}"
            return RemoteFailed(request_id, worker_id, reason)
        else:
            logger.debug("ignored %s from prefill worker %s", type(message).__name__, worker_id)
        return None
