"""Tests for fabric.kvbm.core.events: records, sinks, the vLLM wire codec and the ZMQ publisher.

The golden payloads were produced by msgspec 0.22 (the encoder vLLM uses) from vLLM's own struct
definitions, so they pin byte compatibility independently of our msgpack-based encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from fabric.errors import ConfigError, InvalidInput, InvalidTransition, ProtocolMismatch
from fabric.kvbm.core.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    EventSink,
    FanoutSink,
    KvEvent,
    NullSink,
    RecordingSink,
)
from fabric.kvbm.core.types import BlockHash, SequenceHash, Tier
from fabric.kvbm.stream.publisher import ZmqEventPublisher
from fabric.kvbm.stream.wire import EventBatch, WireFormat, decode_event_batch, encode_event_batch

WAIT_MS = 5_000
LOCALHOST = "tcp://127.0.0.1:0"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
DYNAMO_HASH_0_15 = 15310707395893867146  # Dynamo's local hash of tokens 0..15 (ENVIRONMENT.md)


def _seq(*values: int) -> tuple[SequenceHash, ...]:
    return tuple(SequenceHash(v) for v in values)


# The batch behind both golden payloads.
GOLDEN_EVENTS: tuple[KvEvent, ...] = (
    BlockStored(
        tier=Tier.DEVICE,
        sequence_hashes=_seq(DYNAMO_HASH_0_15, 7),
        parent_hash=None,
        block_hashes=(BlockHash(1), BlockHash(2)),
        token_ids=tuple(range(8)),
        block_size=4,
    ),
    BlockStored(
        tier=Tier.HOST,
        sequence_hashes=_seq(2**64 - 1),
        parent_hash=SequenceHash(42),
        block_hashes=None,
        token_ids=None,
        block_size=16,
    ),
    BlockRemoved(Tier.DISK, _seq(3, 300, 70_000)),
    AllCleared(Tier.DEVICE),
)
GOLDEN_TS = 1.5
# vLLM main (after PR #42892): array batch, tagged-map events, default-valued fields omitted.
GOLDEN_MAP_HEX = (
    "93cb3ff80000000000009488a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368"
    "657392cfd47a8f41c833328a07b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f69"
    "6473980001020304050607aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da3"
    "475055a96c6f72615f6e616d65c088a474797065ab426c6f636b53746f726564ac626c6f636b5f68"
    "617368657391cfffffffffffffffffb1706172656e745f626c6f636b5f686173682aa9746f6b656e"
    "5f69647390aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756daa4350555f5049"
    "4e4e4544a96c6f72615f6e616d65c083a474797065ac426c6f636b52656d6f766564ac626c6f636b"
    "5f6861736865739303cd012cce00011170a66d656469756da44449534b81a474797065b0416c6c42"
    "6c6f636b73436c656172656400"
)
# vLLM v0.15 (msgspec array_like): tagged positional arrays.
GOLDEN_ARRAY_HEX = (
    "93cb3ff80000000000009498ab426c6f636b53746f72656492cfd47a8f41c833328a07c098000102"
    "030405060704c0a3475055c098ab426c6f636b53746f72656491cfffffffffffffffff2a9010c0aa"
    "4350555f50494e4e4544c093ac426c6f636b52656d6f7665649303cd012cce00011170a44449534b"
    "91b0416c6c426c6f636b73436c656172656400"
)
# The same two payloads written out as msgpack structures.
GOLDEN_MAP_STRUCTURE = [
    1.5,
    [
        {
            "type": "BlockStored",
            "block_hashes": [DYNAMO_HASH_0_15, 7],
            "parent_block_hash": None,
            "token_ids": [0, 1, 2, 3, 4, 5, 6, 7],
            "block_size": 4,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        },
        {
            "type": "BlockStored",
            "block_hashes": [2**64 - 1],
            "parent_block_hash": 42,
            "token_ids": [],
            "block_size": 16,
            "lora_id": None,
            "medium": "CPU_PINNED",
            "lora_name": None,
        },
        {"type": "BlockRemoved", "block_hashes": [3, 300, 70_000], "medium": "DISK"},
        {"type": "AllBlocksCleared"},
    ],
    0,
]
GOLDEN_ARRAY_STRUCTURE = [
    1.5,
    [
        [
            "BlockStored",
            [DYNAMO_HASH_0_15, 7],
            None,
            [0, 1, 2, 3, 4, 5, 6, 7],
            4,
            None,
            "GPU",
            None,
        ],
        ["BlockStored", [2**64 - 1], 42, [], 16, None, "CPU_PINNED", None],
        ["BlockRemoved", [3, 300, 70_000], "DISK"],
        ["AllBlocksCleared"],
    ],
    0,
]


def _as_decoded(event: KvEvent) -> KvEvent:
    """What an event becomes after a trip over vLLM's wire format."""
    if isinstance(event, BlockStored):
        return dataclasses.replace(event, block_hashes=None, token_ids=event.token_ids or None)
    if isinstance(event, AllCleared):
        return AllCleared(Tier.DEVICE)
    return event


def _removed(*hashes: int, tier: Tier = Tier.DEVICE) -> BlockRemoved:
    return BlockRemoved(tier, _seq(*hashes))


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_hashes", "token_ids", "block_size"),
    [
        ((BlockHash(1),), None, 4),  # one block hash for two blocks
        (None, tuple(range(7)), 4),  # 7 tokens for two blocks of 4
        (None, None, 0),
    ],
)
def test_block_stored_rejects_inconsistent_batches(
    block_hashes: tuple[BlockHash, ...] | None, token_ids: tuple[int, ...] | None, block_size: int
) -> None:
    with pytest.raises(InvalidInput):
        BlockStored(Tier.DEVICE, _seq(1, 2), None, block_hashes, token_ids, block_size)


def test_records_are_immutable_values() -> None:
    event = _removed(1, 2)
    assert event == _removed(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.tier = Tier.HOST  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------------

SINK_FACTORIES: dict[str, Callable[[], EventSink]] = {
    "null": NullSink,
    "recording": RecordingSink,
    "fanout": lambda: FanoutSink([RecordingSink()]),
    "zmq": lambda: ZmqEventPublisher(LOCALHOST, replay_endpoint=LOCALHOST),
}


@pytest.fixture(params=sorted(SINK_FACTORIES))
def any_sink(request: pytest.FixtureRequest) -> Iterator[EventSink]:
    sink = SINK_FACTORIES[request.param]()
    yield sink
    sink.close()


def test_every_sink_honours_the_protocol(any_sink: EventSink) -> None:
    assert any_sink.enabled == (not isinstance(any_sink, NullSink))
    any_sink.publish(GOLDEN_EVENTS)
    any_sink.publish([])
    any_sink.close()
    any_sink.close()  # idempotent


def test_recording_sink_keeps_events_in_order() -> None:
    sink = RecordingSink()
    sink.publish([_removed(1)])
    sink.publish([_removed(2), AllCleared(Tier.HOST)])
    assert sink.events == [_removed(1), _removed(2), AllCleared(Tier.HOST)]
    sink.close()
    assert sink.closed


class _FailingSink:
    enabled = True

    def publish(self, events: object) -> None:
        raise RuntimeError("subscriber broke")

    def close(self) -> None:
        raise RuntimeError("subscriber broke on close")


def test_fanout_isolates_a_failing_subscriber(caplog: pytest.LogCaptureFixture) -> None:
    before, after = RecordingSink(), RecordingSink()
    fanout = FanoutSink([before, _FailingSink(), after])
    with caplog.at_level(logging.ERROR, logger="fabric.kvbm.core.events"):
        fanout.publish([_removed(1)])
        fanout.close()
    assert before.events == after.events == [_removed(1)]
    assert before.closed and after.closed
    assert sum("failed" in r.getMessage() for r in caplog.records) == 2


def test_fanout_adds_and_removes_subscribers_at_run_time() -> None:
    first, second = RecordingSink(), RecordingSink()
    fanout = FanoutSink([first])
    fanout.publish([_removed(1)])
    fanout.add(second)
    fanout.publish([_removed(2)])
    fanout.remove(first)
    fanout.remove(first)  # unknown now: ignored
    fanout.publish([_removed(3)])
    assert fanout.sinks == (second,)
    assert first.events == [_removed(1), _removed(2)]
    assert second.events == [_removed(2), _removed(3)]
    assert not first.closed  # removal hands the sink back to its owner


# ---------------------------------------------------------------------------------------------
# Wire codec
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire_format", "golden_hex", "structure"),
    [
        (WireFormat.MAP, GOLDEN_MAP_HEX, GOLDEN_MAP_STRUCTURE),
        (WireFormat.ARRAY, GOLDEN_ARRAY_HEX, GOLDEN_ARRAY_STRUCTURE),
    ],
)
def test_encoding_is_byte_identical_to_vllm(
    wire_format: WireFormat, golden_hex: str, structure: list[object]
) -> None:
    payload = encode_event_batch(GOLDEN_EVENTS, ts=GOLDEN_TS, wire_format=wire_format)
    assert msgpack.unpackb(payload) == structure
    assert payload == msgpack.packb(structure)
    assert payload.hex() == golden_hex


u64 = st.integers(0, 2**64 - 1)
hash_tuples = st.lists(u64, max_size=4).map(lambda hs: _seq(*hs))


@st.composite
def stored_events(draw: st.DrawFn) -> BlockStored:
    hashes = draw(hash_tuples)
    block_size = draw(st.integers(1, 4))
    num_tokens = len(hashes) * block_size
    tokens = st.lists(st.integers(0, 2**32 - 1), min_size=num_tokens, max_size=num_tokens)
    return BlockStored(
        tier=draw(st.sampled_from(Tier)),
        sequence_hashes=hashes,
        parent_hash=draw(st.none() | u64.map(SequenceHash)),
        block_hashes=draw(st.none() | st.just(tuple(BlockHash(h) for h in hashes))),
        token_ids=draw(st.none() | tokens.map(tuple)),
        block_size=block_size,
    )


kv_events = st.one_of(
    stored_events(),
    st.builds(BlockRemoved, st.sampled_from(Tier), hash_tuples),
    st.builds(AllCleared, st.sampled_from(Tier)),
)


@given(
    events=st.lists(kv_events, max_size=5),
    ts=st.floats(0, 2e9),
    rank=st.integers(0, 64),
    wire_format=st.sampled_from(WireFormat),
)
def test_decode_inverts_encode(
    events: list[KvEvent], ts: float, rank: int, wire_format: WireFormat
) -> None:
    payload = encode_event_batch(events, ts=ts, data_parallel_rank=rank, wire_format=wire_format)
    expected = tuple(_as_decoded(e) for e in events)
    assert decode_event_batch(payload) == EventBatch(ts, expected, rank)


def test_decode_reads_older_and_newer_vllm_layouts() -> None:
    newest_array = ["BlockStored", [5], 4, [1, 2], 2, None, "CPU_PINNED", None, None, 0, "x", None]
    before_medium = ["BlockStored", [6], None, [3, 4], 2, None]  # vLLM 0.9: medium missing
    map_with_new_fields = {"type": "BlockRemoved", "block_hashes": [7], "group_idx": 0, "x": 1}
    payload = msgpack.packb([2.0, [newest_array, before_medium, map_with_new_fields]])
    assert decode_event_batch(payload) == EventBatch(
        2.0,
        (
            BlockStored(Tier.HOST, _seq(5), SequenceHash(4), None, (1, 2), 2),
            BlockStored(Tier.DEVICE, _seq(6), None, None, (3, 4), 2),
            _removed(7),
        ),
        None,
    )


def _batch(*events: object) -> bytes:
    return msgpack.packb([1.0, list(events), 0])


GOLDEN_MAP = bytes.fromhex(GOLDEN_MAP_HEX)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="not-msgpack"),
        pytest.param(GOLDEN_MAP[:-1], id="truncated"),
        pytest.param(GOLDEN_MAP + b"\x00", id="trailing-bytes"),
        pytest.param(msgpack.packb({"ts": 1.0, "events": []}), id="batch-not-array"),
        pytest.param(msgpack.packb([1.0]), id="batch-too-short"),
        pytest.param(msgpack.packb(["now", [], 0]), id="ts-not-number"),
        pytest.param(msgpack.packb([1.0, [], "r"]), id="rank-not-int"),
        pytest.param(_batch(7), id="event-not-map-or-array"),
        pytest.param(_batch([]), id="empty-event"),
        pytest.param(_batch(["Nope"]), id="unknown-tag"),
        pytest.param(_batch({"block_hashes": [1]}), id="map-without-type"),
        pytest.param(_batch(["BlockStored", [1], None, []]), id="missing-block-size"),
        pytest.param(_batch({"type": "BlockRemoved", "medium": "GPU"}), id="missing-hashes"),
        pytest.param(_batch(["BlockRemoved", [1, "x"], "GPU"]), id="hash-not-int"),
        pytest.param(_batch(["BlockRemoved", [1], "TAPE"]), id="unknown-medium"),
        pytest.param(_batch(["BlockStored", [1], "p", [], 4]), id="parent-not-int"),
        pytest.param(_batch(["BlockStored", [1], None, [], 4.0]), id="block-size-not-int"),
        pytest.param(_batch(["BlockStored", [1], None, [1, 2, 3], 2]), id="token-count"),
        pytest.param(_batch(["BlockStored", [1], None, ["a", "b"], 2]), id="token-not-int"),
        pytest.param(
            _batch({"type": "BlockStored", "block_hashes": [], "token_ids": [], "block_size": 2}),
            id="map-without-parent",
        ),
    ],
)
def test_decode_rejects_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(ProtocolMismatch):
        decode_event_batch(payload)


# ---------------------------------------------------------------------------------------------
# ZMQ publisher
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def publishers() -> Iterator[list[ZmqEventPublisher]]:
    """Publishers a test starts; all closed in teardown."""
    started: list[ZmqEventPublisher] = []
    yield started
    for publisher in started:
        publisher.close()


@pytest.fixture
def zsockets() -> Iterator[Callable[[int], zmq.Socket[bytes]]]:
    """Client sockets a test opens; all closed (linger 0) in teardown."""
    ctx = zmq.Context()
    opened: list[zmq.Socket[bytes]] = []

    def open_socket(kind: int) -> zmq.Socket[bytes]:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        opened.append(sock)
        return sock

    yield open_socket
    for sock in opened:
        sock.close(linger=0)
    ctx.term()


def _recv(sock: zmq.Socket[bytes]) -> list[bytes]:
    assert sock.poll(WAIT_MS), "no message within the wait bound"
    return sock.recv_multipart()


def _replay(dealer: zmq.Socket[bytes], start_seq: int) -> list[tuple[int, EventBatch]]:
    dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
    replayed = []
    while True:
        empty, seq, payload = _recv(dealer)
        assert empty == b""
        if seq == END_SEQ:
            assert payload == b""
            return replayed
        replayed.append((int.from_bytes(seq, "big"), decode_event_batch(payload)))


class _GatedTier:
    """A stand-in tier whose ``medium`` blocks until released: it holds the publisher thread."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    @property
    def medium(self) -> str:
        self.entered.set()
        assert self.release.wait(WAIT_MS / 1000)
        return Tier.DEVICE.medium


def test_subscriber_receives_batches_with_consecutive_sequence_numbers(
    publishers: list[ZmqEventPublisher], zsockets: Callable[[int], zmq.Socket[bytes]]
) -> None:
    publisher = ZmqEventPublisher(LOCALHOST, topic="kv-events")
    publishers.append(publisher)
    assert publisher.endpoint.startswith("tcp://127.0.0.1:")
    assert not publisher.endpoint.endswith(":0")
    sub = zsockets(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    sub.connect(publisher.endpoint)
    # A SUB only hears what is sent after its subscription arrived: probe until one gets through.
    deadline = time.monotonic() + WAIT_MS / 1000
    while not sub.poll(20):
        assert time.monotonic() < deadline, "subscription never reached the publisher"
        publisher.publish([AllCleared(Tier.DEVICE)])
    wanted = [[_removed(i, tier=Tier.HOST)] for i in range(5)]
    for batch in wanted:
        publisher.publish(batch)
    seqs, received = [], []
    while len(received) < len(wanted):
        topic, seq, payload = _recv(sub)
        assert topic == b"kv-events"
        seqs.append(int.from_bytes(seq, "big"))
        events = list(decode_event_batch(payload).events)
        if events != [AllCleared(Tier.DEVICE)]:
            received.append(events)
    assert received == wanted
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_late_subscriber_gets_missed_batches_by_replay(
    publishers: list[ZmqEventPublisher], zsockets: Callable[[int], zmq.Socket[bytes]]
) -> None:
    publisher = ZmqEventPublisher(LOCALHOST, replay_endpoint=LOCALHOST, data_parallel_rank=3)
    publishers.append(publisher)
    batches = [[_removed(i)] for i in range(4)]
    for batch in batches:
        publisher.publish(batch)
    assert publisher.replay_endpoint is not None
    dealer = zsockets(zmq.DEALER)
    dealer.connect(publisher.replay_endpoint)
    replayed = _replay(dealer, 0)
    assert [seq for seq, _ in replayed] == [0, 1, 2, 3]
    assert [list(b.events) for _, b in replayed] == batches
    assert {b.data_parallel_rank for _, b in replayed} == {3}
    assert [seq for seq, _ in _replay(dealer, 2)] == [2, 3]


def test_replay_serves_only_the_last_buffer_steps_batches(
    publishers: list[ZmqEventPublisher], zsockets: Callable[[int], zmq.Socket[bytes]]
) -> None:
    publisher = ZmqEventPublisher(LOCALHOST, replay_endpoint=LOCALHOST, buffer_steps=2)
    publishers.append(publisher)
    for i in range(5):
        publisher.publish([_removed(i)])
    assert publisher.replay_endpoint is not None
    dealer = zsockets(zmq.DEALER)
    dealer.connect(publisher.replay_endpoint)
    assert [seq for seq, _ in _replay(dealer, 0)] == [3, 4]


def test_full_queue_drops_oldest_and_leaves_a_sequence_gap(
    publishers: list[ZmqEventPublisher], zsockets: Callable[[int], zmq.Socket[bytes]]
) -> None:
    publisher = ZmqEventPublisher(LOCALHOST, replay_endpoint=LOCALHOST, max_queue_size=2)
    publishers.append(publisher)
    gate = _GatedTier()
    publisher.publish([BlockRemoved(gate, _seq(0))])  # type: ignore[arg-type]
    assert gate.entered.wait(WAIT_MS / 1000)  # the thread holds batch 0; the queue is empty
    for i in range(1, 6):
        publisher.publish([_removed(i)])
    assert publisher.num_dropped == 3  # batches 1, 2, 3 made room for 4 and 5
    gate.release.set()
    assert publisher.replay_endpoint is not None
    dealer = zsockets(zmq.DEALER)
    dealer.connect(publisher.replay_endpoint)
    assert [seq for seq, _ in _replay(dealer, 0)] == [0, 4, 5]


def test_close_is_bounded_and_releases_the_ports(
    zsockets: Callable[[int], zmq.Socket[bytes]],
) -> None:
    publisher = ZmqEventPublisher(LOCALHOST, replay_endpoint=LOCALHOST)
    publisher.publish([_removed(1)])
    started = time.monotonic()
    publisher.close()
    assert time.monotonic() - started < 1.0
    with pytest.raises(InvalidTransition):
        publisher.publish([_removed(2)])
    publisher.close()
    assert publisher.replay_endpoint is not None
    for endpoint in (publisher.endpoint, publisher.replay_endpoint):
        zsockets(zmq.PUB).bind(endpoint)  # raises EADDRINUSE if the port were still held


def test_close_gives_up_on_a_stuck_thread_after_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = ZmqEventPublisher(LOCALHOST, close_timeout=0.2)
    gate = _GatedTier()
    publisher.publish([BlockRemoved(gate, _seq(0))])  # type: ignore[arg-type]
    assert gate.entered.wait(WAIT_MS / 1000)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="fabric.kvbm.core.events"):
            publisher.close()
        assert 0.2 <= time.monotonic() - started < 1.0
        assert any("still running" in r.getMessage() for r in caplog.records)
    finally:
        gate.release.set()
        publisher.close()  # joins the now released thread


def test_a_busy_port_is_a_config_error(publishers: list[ZmqEventPublisher]) -> None:
    publisher = ZmqEventPublisher(LOCALHOST)
    publishers.append(publisher)
    with pytest.raises(ConfigError, match="cannot bind"):
        ZmqEventPublisher(LOCALHOST, replay_endpoint=publisher.endpoint)


def test_the_wake_socket_is_drained_after_a_publish(publishers: list[ZmqEventPublisher]) -> None:
    """An undrained wake socket keeps the publisher thread spinning on every later poll."""
    publisher = ZmqEventPublisher(LOCALHOST)
    publishers.append(publisher)
    publisher.publish([AllCleared(Tier.DEVICE)])
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        try:
            publisher._wake_recv.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return  # drained by the publisher thread
        assert time.monotonic() < deadline, "the publisher never drained its wake socket"
        time.sleep(0.01)
