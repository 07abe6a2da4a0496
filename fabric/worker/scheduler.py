"""The scheduler thread: the one owner of a worker's engine, block manager and peer sockets.

The ``SignalServer`` calls ``handle`` on its own thread for every message; ``handle`` computes
nothing: it checks the message suits the worker's role and queues it with its arrival time.
The scheduler thread loops::

    drain the inbox (wait when idle) ─▶ dispatch each message to the role's service
        ─▶ service steps: prefill role computes one queued prompt and expires stale handoffs;
           decode / aggregated roles collect remote prefills, admit, run one engine step
           (every decode and the prompt chunks its token budget allows)

Messages by role: PREFILL serves ``PrefillRequest``, ``TransferDone`` and ``Abort``; DECODE
serves ``GenerateRequest`` and ``Abort``; AGGREGATED serves all four (it computes its own requests
and serves its cached prefixes to peers: a "peer hit" is a ``PrefillRequest`` from another worker
that reads the blocks instead of computing them). Anything else is answered ``ErrorReply``
(``UNKNOWN_TYPE``; a ``GenerateRequest`` to a prefill worker gets an error ``TokenChunk``).

Offload: with a host or disk tier, the worker's ``OffloadManager`` is stepped once per loop
(finished copies registered, next batches dispatched; it never blocks). Copies pin device
blocks, so when some finish a request waiting for room is retried.

Waiting: with local work the loop does not wait; with remote prefills in flight it waits up to
``POLL_S`` on their signal links (not on the inbox, so their replies are taken as they arrive;
the inbox is still drained every loop); with only offload copies or held handoffs (a decode's
READ over TCP needs this side's agent progressed) in flight it waits ``POLL_S`` on the inbox;
idle, it waits on the inbox (``IDLE_S``, which also paces handoff expiry).

Draining (``drain``, on a worker's first SIGTERM)::

    SERVING ──drain()──▶ DRAINING ──nothing in flight──▶ DRAINED (``wait_drained`` returns True)
                            │                              │
                            └──────── close() ─────────────┴──▶ CLOSED (what is left ends
                                                                 with an error chunk)

While draining, a new ``GenerateRequest`` is refused at once with ``ErrorReply(request_id,
UNAVAILABLE)`` from the signal thread (the frontend routes it to another worker); everything
else is served as before: requests already accepted (queued in the inbox, waiting, prefilling,
decoding) run to their end, and a prefill or aggregated worker keeps its holds until read,
aborted or expired, and still computes a ``PrefillRequest`` that arrives (a decode whose
frontend had not seen the drain yet: serving it costs one prefill, refusing it a recompute).
The loop sets DRAINED once ``MIN_DRAIN_S`` has passed, the inbox is empty and no service has a
request in flight or a hold; the minimum lets what peers sent before they saw the record's
``draining`` mark (a watch round trip) arrive and be served. From DRAINED on, every new
``GenerateRequest`` or ``PrefillRequest`` is refused with ``UNAVAILABLE`` (the worker is closing;
a decode falls back as ``--prefill-fallback`` says).

Failures: an unexpected exception in a step is logged with its traceback, every request in
flight is ended with an error chunk and its blocks released, and the loop goes on. ``close``
stops the loop; the services then end and release everything on this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from fabric.discovery.registry import Role
from fabric.errors import ConfigError
from fabric.kvbm import OffloadManager
from fabric.signal.errors import ErrorCode
from fabric.signal.framing import PeerId
from fabric.signal.messages import (
    Abort,
    ErrorReply,
    GenerateRequest,
    Message,
    PrefillRequest,
    TransferDone,
)
from fabric.worker.generation import GenerationService
from fabric.worker.prefill_service import PrefillService
from fabric.worker.request import error_chunk

logger = logging.getLogger(__name__)

IDLE_S = 0.05
POLL_S = 0.002
MIN_DRAIN_S = 1.0
"""The shortest drain: messages sent before peers saw the ``draining`` mark arrive within it."""
_NEW_WORK = (GenerateRequest, PrefillRequest)
_ROLE_TO_TYPES: dict[Role, tuple[type, ...]] = {
    Role.PREFILL: (PrefillRequest, TransferDone, Abort),
    Role.DECODE: (GenerateRequest, Abort),
    Role.AGGREGATED: (GenerateRequest, PrefillRequest, TransferDone, Abort),
}


class Scheduler:
    """Owns the role's service on one thread (see the module docstring)."""

    def __init__(self, role: Role, *, threads: int = 1, name: str = "scheduler") -> None:
        self.role = role
        self._threads = threads
        self._generation: GenerationService | None = None
        self._prefill: PrefillService | None = None
        self._offload: OffloadManager | None = None
        self._inbox: queue.SimpleQueue[tuple[Message, PeerId, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._drained = threading.Event()
        self._accepting = threading.Lock()  # handle's check-and-queue against DRAINED
        self._drain_began = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self) -> None:
        """Refuse new ``GenerateRequest``s from now on and finish the rest (idempotent)."""
        if not self._draining.is_set():
            self._drain_began = time.monotonic()
            self._draining.set()

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a drain to end; True once nothing is in flight."""
        return self._drained.wait(timeout_s)

    def start(
        self,
        *,
        generation: GenerationService | None = None,
        prefill: PrefillService | None = None,
        offload: OffloadManager | None = None,
    ) -> Scheduler:
        """Start the loop with the role's service (messages queued before wait for it) and the
        offload manager, if any (this thread owns it from here; it is closed when the loop ends).

        Raises:
            ConfigError: the services do not suit the role (prefill needs ``prefill``, decode
                ``generation``, aggregated both).
        """
        wants_prefill = self.role in (Role.PREFILL, Role.AGGREGATED)
        wants_generation = self.role in (Role.DECODE, Role.AGGREGATED)
        if (prefill is not None) != wants_prefill or (generation is not None) != wants_generation:
            raise ConfigError(f"a {self.role.value} worker needs exactly its own services")
        self._generation, self._prefill, self._offload = generation, prefill, offload
        self._thread.start()
        return self

    def handle(self, message: Message, peer: PeerId) -> Message | None:
        """The ``SignalServer`` handler: queue a message this role serves, refuse the rest
        (and, while draining, every new ``GenerateRequest``)."""
        if isinstance(message, _ROLE_TO_TYPES[self.role]):
            with self._accepting:  # no message queued after the loop found the drain done
                refused = (isinstance(message, _NEW_WORK) and self._drained.is_set()) or (
                    isinstance(message, GenerateRequest) and self.draining
                )
                if not refused:
                    self._inbox.put((message, peer, time.perf_counter()))
                    return None
            assert isinstance(message, _NEW_WORK)
            logger.info("%s %s refused: draining", type(message).__name__, message.request_id)
            return ErrorReply(
                message.request_id,
                ErrorCode.UNAVAILABLE,
                f"the worker is draining (shutting down) and takes no new requests; send "
                f"request {message.request_id} to another worker",
            )
        text = f"a {self.role.value} worker does not serve {type(message).__name__}"
        if isinstance(message, GenerateRequest):
            return error_chunk(message.request_id, text)
        return ErrorReply(getattr(message, "request_id", None), ErrorCode.UNKNOWN_TYPE, text)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the loop; requests in flight end with an error chunk (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("the scheduler did not stop within %.1f s", timeout_s)

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self._threads)  # per thread with some OpenMP runtimes
        next_expiry = 0.0
        try:
            while not self._stop.is_set():
                gen, prefill = self._generation, self._prefill
                busy = (gen is not None and gen.has_local_work) or (
                    prefill is not None and prefill.has_work
                )
                remote = gen is not None and gen.has_remote_work
                copying = self._offload is not None and not self._offload.idle
                lent = prefill is not None and prefill.has_held  # decodes read: progress
                # with prefills in flight the wait is on their links (gen.step): a BlocksReady
                # or KvLayers is taken as it arrives, not after an inbox wait
                self._drain(0.0 if busy or remote else POLL_S if copying or lent else IDLE_S)
                try:
                    if gen is not None:
                        gen.step(0.0 if busy else POLL_S)
                    if prefill is not None:
                        prefill.step()
                        if time.monotonic() >= next_expiry:
                            prefill.expire()
                            next_expiry = time.monotonic() + IDLE_S
                    self._step_offload()  # after the steps: their registrations go out now
                except Exception:
                    logger.exception("scheduler step failed; ending every request in flight")
                    self._fail_all("internal error in the worker (see its log)")
                if self._draining.is_set() and not self._drained.is_set():
                    self._maybe_drained()
        finally:
            if self._generation is not None:
                self._generation.close()
            if self._prefill is not None:
                self._prefill.close()
            if self._offload is not None:
                self._offload.close()

    def _maybe_drained(self) -> None:
        """Set DRAINED when the inbox is empty and no request or hold is left (module docstring)."""
        gen, prefill = self._generation, self._prefill
        num_left = (gen.num_requests if gen is not None else 0) + (
            prefill.num_in_flight if prefill is not None else 0
        )
        if num_left == 0 and time.monotonic() >= self._drain_began + MIN_DRAIN_S:
            with self._accepting:
                if self._inbox.empty():
                    self._drained.set()
            if self._drained.is_set():
                logger.info("drained: no request in flight")

    def _step_offload(self) -> None:
        """Step the offload manager; when copies ended (their pins released), retry admission."""
        if self._offload is None:
            return
        was_copying = not self._offload.idle
        if self._offload.step() or (was_copying and self._offload.idle):
            if self._generation is not None:
                self._generation.retry_admission()
            if self._prefill is not None:
                self._prefill.retry_admission()

    def _drain(self, timeout_s: float) -> None:
        try:
            item = self._inbox.get(timeout=timeout_s) if timeout_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._dispatch(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, message: Message, peer: PeerId, arrived_at: float) -> None:
        gen, prefill = self._generation, self._prefill
        if isinstance(message, GenerateRequest) and gen is not None:
            gen.submit(message, peer, arrived_at)
        elif isinstance(message, PrefillRequest) and prefill is not None:
            prefill.submit(message, peer, arrived_at)
        elif isinstance(message, TransferDone) and prefill is not None:
            prefill.complete(message)
        elif isinstance(message, Abort):
            if gen is not None:
                gen.abort(message.request_id, message.reason)
            if prefill is not None:
                prefill.abort(message.request_id)

    def _fail_all(self, message: str) -> None:
        if self._generation is not None:
            self._generation.fail_all(message)
        if self._prefill is not None:
            self._prefill.fail_queued(message)
