"""``KvEventSubscriber``: one worker's KV event stream (vLLM wire format) into a ``KvPrefixIndex``.

Owns a SUB socket on the worker's ``events`` endpoint and, when the worker has one, a DEALER on
its ``events_replay`` ROUTER (``fabric.kvbm.stream.publisher``'s protocol: send
``[b"", start_seq]``, receive ``[b"", seq, payload]`` per buffered batch, then ``[b"", -1, b""]``).
Both sockets belong to the subscriber's thread, which creates, uses and closes them.

Sequence numbers (one per batch, +1 each) keep the index exact:

* On start the thread connects SUB first, then replays from 0, so batches published before the
  subscription are applied too; live batches already covered by the replay are skipped.
* A live batch beyond ``last + 1`` is a gap (the PUB dropped messages, or the subscription was
  late): the missing range is replayed. When the replay no longer holds it (or there is no replay
  endpoint), or a batch cannot be decoded, the worker's entries are cleared (WARNING): the index
  may then miss blocks, never claim removed ones.
* A restarted worker starts again at 0: the router sees its new record (``started_at``) and
  replaces the subscriber, whose index entries it clears.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from fabric.auth import keys_from_env, secure_client
from fabric.errors import ProtocolMismatch
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.kvbm import decode_event_batch

logger = logging.getLogger(__name__)

_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KvEventSubscriber:
    """Keeps ``index`` current with one worker's KV events (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        index: KvPrefixIndex,
        *,
        endpoint: str,
        replay_endpoint: str | None,
        poll_interval_s: float = 0.1,
        replay_timeout_s: float = 2.0,
        close_timeout_s: float = 2.0,
    ) -> None:
        self.worker_id = worker_id
        self._index = index
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._poll_ms = max(1, int(poll_interval_s * 1000))
        self._replay_timeout_s = replay_timeout_s
        self._close_timeout_s = close_timeout_s
        self._last_seq: int | None = None
        self._num_batches = 0
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"kv-events:{worker_id}", daemon=True
        )

    @property
    def num_batches(self) -> int:
        """Batches applied to the index so far (replayed and live)."""
        return self._num_batches

    def start(self) -> KvEventSubscriber:
        self._thread.start()
        return self

    def wait_synced(self, timeout_s: float) -> bool:
        """Wait until the initial replay was applied (or found empty / unavailable)."""
        return self._synced.wait(timeout_s)

    def close(self) -> None:
        """Stop the thread (bounded); idempotent. The caller clears the worker's entries."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._close_timeout_s)
            if self._thread.is_alive():
                logger.warning("KV event subscriber of %s did not stop in time", self.worker_id)

    # Subscriber thread
    # -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        replay = ctx.socket(zmq.DEALER) if self._replay_endpoint else None
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            keys = keys_from_env()  # CURVE when the deployment has keys (fabric.auth)
            secure_client(sub, keys)
            sub.connect(self._endpoint)
            if replay is not None and self._replay_endpoint is not None:
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
            while not self._stop.is_set():
                if not sub.poll(self._poll_ms):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    logger.warning("%s: ignoring a badly framed KV event message", self.worker_id)
                    continue
                self._on_live(replay, int.from_bytes(frames[1], "big"), frames[2])
        except Exception:
            logger.exception(
                "KV event subscriber of %s failed; its index entries are cleared", self.worker_id
            )
            self._index.clear_worker(self.worker_id)
        finally:
            self._synced.set()
            sub.close(linger=0)
            if replay is not None:
                replay.close(linger=0)

    def _on_live(self, replay: zmq.Socket[bytes] | None, seq: int, payload: bytes) -> None:
        last = self._last_seq
        if last is not None and seq <= last:
            return  # already applied through the replay
        if last is not None and seq > last + 1:
            if replay is not None:
                self._replay_from(replay, last + 1)
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
            if self._stop.is_set():
                return
            if not replay.poll(max(1, int(remaining_ms))):
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
