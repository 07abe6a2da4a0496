"""``KvEventSubscriber``: one worker's KV event stream (vLLM wire format) into a ``KvPrefixIndex``.

Owns, per subscriber, a SUB socket on the worker's ``events`` endpoint and, when the worker has
one, a DEALER on its ``events_replay`` ROUTER (``fabric.kvbm.stream.publisher``'s protocol: send
``[b"", start_seq]``, receive ``[b"", seq, payload]`` per buffered batch, then ``[b"", -1, b""]``).

One thread follows every subscriber of the process (``_Hub``): it creates, polls, reads and
closes all their sockets, so a fleet of hundreds of workers costs one thread, not one each (an
idle thread per worker wakes to take the GIL several times a second and keeps a malloc arena of
its own). ``start`` and ``close`` hand the subscriber to that thread through a queue and a
wake-up pipe; it sleeps in one ``zmq.Poller.poll`` over every SUB socket and the pipe. A
readable SUB socket is drained (up to ``MAX_DRAIN`` batches) before the next poll. Replays run on
that thread too: a joining worker's replay, bounded by ``replay_timeout_s``, delays the others'
batches (they wait in their sockets' queues), never drops them.

Sequence numbers (one per batch, +1 each) keep the index exact:

* On start the subscriber connects SUB first, then replays from 0, so batches published before
  the subscription are applied too; live batches already covered by the replay are skipped.
* A live batch beyond ``last + 1`` is a gap (the PUB dropped messages, or the subscription was
  late): the missing range is replayed. When the replay no longer holds it (or there is no replay
  endpoint), or a batch cannot be decoded, the worker's entries are cleared (WARNING): the index
  may then miss blocks, never claim removed ones. A subscriber whose sockets fail is closed and
  its worker's entries cleared; the others go on.
* A restarted worker starts again at 0: the router sees its new record (``started_at``) and
  replaces the subscriber, whose index entries it clears.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from fabric.auth import keys_from_env, secure_client
from fabric.errors import ProtocolMismatch
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.kvbm import decode_event_batch

logger = logging.getLogger(__name__)

_END_SEQ = (-1).to_bytes(8, "big", signed=True)
MAX_DRAIN = 256
"""Batches read from one readable SUB socket before the others get their turn."""
_STOP_CHECK_MS = 100
"""How often a replay in progress looks whether its subscriber is being closed."""


class KvEventSubscriber:
    """Keeps ``index`` current with one worker's KV events (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        index: KvPrefixIndex,
        *,
        endpoint: str,
        replay_endpoint: str | None,
        replay_timeout_s: float = 2.0,
        close_timeout_s: float = 2.0,
    ) -> None:
        self.worker_id = worker_id
        self._index = index
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._replay_timeout_s = replay_timeout_s
        self._close_timeout_s = close_timeout_s
        self._last_seq: int | None = None
        self._num_batches = 0
        self._started = False
        self._stopping = False
        self._synced = threading.Event()
        self._closed = threading.Event()
        self._sub: zmq.Socket[bytes] | None = None
        self._replay: zmq.Socket[bytes] | None = None

    @property
    def num_batches(self) -> int:
        """Batches applied to the index so far (replayed and live)."""
        return self._num_batches

    def start(self) -> KvEventSubscriber:
        self._started = True
        _hub().submit(self, opening=True)
        return self

    def wait_synced(self, timeout_s: float) -> bool:
        """Wait until the initial replay was applied (or found empty / unavailable)."""
        return self._synced.wait(timeout_s)

    def close(self) -> None:
        """Close the sockets (bounded wait); idempotent. The caller clears the worker's entries."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        _hub().submit(self, opening=False)
        if not self._closed.wait(self._close_timeout_s):
            logger.warning("KV event subscriber of %s did not stop in time", self.worker_id)

    # On the hub's thread
    # -----------------------------------------------------------------------------------------

    def _open(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        """Connect, replay from 0; returns the SUB socket to poll."""
        sub = self._sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        keys = keys_from_env()  # CURVE when the deployment has keys (fabric.auth)
        secure_client(sub, keys)
        sub.connect(self._endpoint)
        if self._replay_endpoint is not None:
            replay = self._replay = ctx.socket(zmq.DEALER)
            replay.setsockopt(zmq.LINGER, 0)
            secure_client(replay, keys)
            replay.connect(self._replay_endpoint)
            self._replay_from(replay, 0)
        self._synced.set()
        logger.info(
            "following KV events of %s on %s (replayed up to seq %s)",
            self.worker_id,
            self._endpoint,
            self._last_seq,
        )
        return sub

    def _drain(self) -> None:
        """Apply the batches waiting on the SUB socket (at most ``MAX_DRAIN``); none once
        ``close`` was called, even before the hub gets to the close."""
        assert self._sub is not None, "opened"
        for _ in range(MAX_DRAIN):
            if self._stopping:  # closing: its worker's entries are being cleared
                return
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                logger.warning("%s: ignoring a badly framed KV event message", self.worker_id)
                continue
            self._on_live(int.from_bytes(frames[1], "big"), frames[2])

    def _shut(self) -> None:
        """Close the sockets (idempotent); wakes ``close`` and ``wait_synced``."""
        for sock in (self._sub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._sub = self._replay = None
        self._synced.set()
        self._closed.set()

    def _on_live(self, seq: int, payload: bytes) -> None:
        last = self._last_seq
        if last is not None and seq <= last:
            return  # already applied through the replay
        if last is not None and seq > last + 1:
            if self._replay is not None:
                self._replay_from(self._replay, last + 1)
            replayed_to = self._last_seq if self._last_seq is not None else last
            if replayed_to < seq - 1:
                self._lost(f"batches {replayed_to + 1}..{seq - 1} were not delivered or replayed")
            elif seq <= replayed_to:
                return
        self._apply(seq, payload)

    def _replay_from(self, replay: zmq.Socket[bytes], start_seq: int) -> None:
        """Apply every buffered batch from ``start_seq``; a hole at its start is a loss."""
        replay.send_multipart((b"", start_seq.to_bytes(8, "big")))
        deadline = time.monotonic() + self._replay_timeout_s
        first = True
        while (remaining_ms := (deadline - time.monotonic()) * 1000) > 0:
            if self._stopping:
                return
            if not replay.poll(max(1, int(min(remaining_ms, _STOP_CHECK_MS)))):
                continue
            frames = replay.recv_multipart()
            if len(frames) != 3 or frames[1] == _END_SEQ:
                return
            seq = int.from_bytes(frames[1], "big")
            if first and seq > start_seq and start_seq > 0:
                self._lost(f"batches {start_seq}..{seq - 1} are no longer in the replay buffer")
            first = False
            if self._last_seq is None or seq > self._last_seq:
                self._apply(seq, frames[2])
        logger.warning(
            "%s: no complete KV event replay from %s within %.1f s",
            self.worker_id,
            self._replay_endpoint,
            self._replay_timeout_s,
        )

    def _apply(self, seq: int, payload: bytes) -> None:
        self._last_seq = seq
        try:
            batch = decode_event_batch(payload)
        except ProtocolMismatch as exc:
            self._lost(f"batch {seq} could not be decoded: {exc}")
            return
        self._index.apply(self.worker_id, batch.events)
        self._num_batches += 1

    def _lost(self, reason: str) -> None:
        logger.warning(
            "%s: KV events lost (%s); forgetting its cached blocks until new events arrive",
            self.worker_id,
            reason,
        )
        self._index.clear_worker(self.worker_id)


class _Hub:
    """The one thread that owns every subscriber's sockets (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: deque[tuple[KvEventSubscriber, bool]] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def submit(self, subscriber: KvEventSubscriber, *, opening: bool) -> None:
        """Open (``opening``) or close ``subscriber`` on the hub's thread, soon."""
        with self._lock:
            self._requests.append((subscriber, opening))
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes the hub just as well
            os.write(self._wake_write, b"\0")

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        poller = zmq.Poller()
        poller.register(self._wake_read, zmq.POLLIN)
        socket_to_subscriber: dict[zmq.Socket[bytes], KvEventSubscriber] = {}
        while True:
            try:
                ready_items = poller.poll()
            except zmq.ZMQError:  # never expected: sockets leave the poller before closing
                logger.exception("KV event hub: poll failed; polling again")
                time.sleep(0.1)
                continue
            for ready, _ in ready_items:
                if isinstance(ready, int):
                    self._serve_requests(ctx, poller, socket_to_subscriber)
                    continue
                subscriber = socket_to_subscriber.get(ready)
                if subscriber is not None:
                    self._guarded(subscriber, subscriber._drain, poller, socket_to_subscriber)

    def _serve_requests(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        poller: zmq.Poller,
        socket_to_subscriber: dict[zmq.Socket[bytes], KvEventSubscriber],
    ) -> None:
        while True:
            try:
                os.read(self._wake_read, 4096)
            except BlockingIOError:
                break
        with self._lock:
            requests = list(self._requests)
            self._requests.clear()
        for subscriber, opening in requests:
            if not opening:
                self._forget(subscriber, poller, socket_to_subscriber)
            elif not subscriber._stopping:

                def do_open(subscriber: KvEventSubscriber = subscriber) -> None:
                    sub = subscriber._open(ctx)
                    poller.register(sub, zmq.POLLIN)
                    socket_to_subscriber[sub] = subscriber

                self._guarded(subscriber, do_open, poller, socket_to_subscriber)

    def _guarded(
        self,
        subscriber: KvEventSubscriber,
        step: Callable[[], None],
        poller: zmq.Poller,
        socket_to_subscriber: dict[zmq.Socket[bytes], KvEventSubscriber],
    ) -> None:
        """Run one subscriber's ``step``; a failure closes that subscriber alone."""
        try:
            step()
        except Exception:
            logger.exception(
                "KV event subscriber of %s failed; its index entries are cleared",
                subscriber.worker_id,
            )
            self._forget(subscriber, poller, socket_to_subscriber)
            subscriber._index.clear_worker(subscriber.worker_id)

    @staticmethod
    def _forget(
        subscriber: KvEventSubscriber,
        poller: zmq.Poller,
        socket_to_subscriber: dict[zmq.Socket[bytes], KvEventSubscriber],
    ) -> None:
        sub = subscriber._sub
        if sub is not None and socket_to_subscriber.pop(sub, None) is not None:
            poller.unregister(sub)
        subscriber._shut()


_hub_lock = threading.Lock()
_pid_to_hub: dict[int, _Hub] = {}
"""The process's hub (a forked child, whose copy has no thread, starts its own)."""


def _hub() -> _Hub:
    """The process's hub, started on first use."""
    pid = os.getpid()
    with _hub_lock:
        hub = _pid_to_hub.get(pid)
        if hub is None:
            hub = _pid_to_hub[pid] = _Hub()
        return hub
