"""Layer-wise handoff through the real prefill service and engine into the decode's streams, in
one process (loopback agents): the decode's READs run inside the prefill's forward pass, as each
``KvLayers`` is pushed, and the loopback agent copies at post time, so a layer announced before
the engine wrote it would land stale. Checked: the decode's blocks equal the prefill's byte for
byte, several READs ran before ``BlocksReady``, a prefill that does not grant layer-wise (or a
request that does not ask) gets today's whole offer, a failed read mid-stream leaves nothing in
flight, a prefill longer than the hold timeout keeps its hold (the timeout counts from
``BlocksReady``) while a decode that left still frees it, and every block is released on both
sides."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registration import WorkerEvent, WorkerEventKind
from fabric.discovery.registry import Role
from fabric.engine import Engine
from fabric.errors import PeerUnavailable
from fabric.kvbm import KvBlockManager, RemoteBlockSet, SequenceBlocks, build_kvbm, load_kvbm_config
from fabric.kvbm.tiers.storage import TensorStorage
from fabric.models.config import ModelConfig
from fabric.signal.framing import PeerId
from fabric.signal.messages import (
    LAYERWISE_OPTION,
    BlocksReady,
    KvLayers,
    KvStream,
    Message,
    PrefillRequest,
    TokenChunk,
    TransferDone,
)
from fabric.transfer import LoopbackAgent, LoopbackRegistry
from fabric.worker.handoff import DecodeHandoff, PrefillHandoff
from fabric.worker.metrics import WorkerMetrics
from fabric.worker.prefill_service import PrefillService
from fabric.worker.streams import DecodeStreams, StreamedRead

DECODE = PeerId("decode-1")
BLOCK = 16
SHORT_HOLD_S = 0.05


@dataclass
class Decode:
    """The decode side the prefill's pushes reach at once (its scheduler, in effect)."""

    kvbm: KvBlockManager
    agent: LoopbackAgent
    streams: DecodeStreams
    seq: SequenceBlocks | None = None
    pushed: list[Message] = field(default_factory=list)
    reads_at_ready: int | None = None
    finished: StreamedRead | None = None

    def send(self, peer: str, message: Message) -> None:
        assert peer == DECODE
        self.pushed.append(message)
        assert self.seq is not None
        if isinstance(message, KvStream):
            num_blocks = -(-message.num_tokens // BLOCK)
            self.streams.begin(message, 0, self.seq.block_table[:num_blocks])
        elif isinstance(message, KvLayers):
            self.streams.advance(message)
            self.streams.poll()
        elif isinstance(message, BlocksReady):
            self.finished = self.streams.finish(message)

    def send_all(self, peer: str, messages: Sequence[Message]) -> None:
        for message in messages:
            self.send(peer, message)


@dataclass
class Pair:
    prefill_kvbm: KvBlockManager
    handoff: PrefillHandoff
    service: PrefillService
    decode: Decode
    registry: LoopbackRegistry


def _kvbm(tiny_dir: Path) -> KvBlockManager:
    config = load_kvbm_config(block_size=BLOCK, device_blocks=32)
    return build_kvbm(config, ModelConfig.from_dir(tiny_dir).kv_geometry())


def _make_pair(tiny_dir: Path, *, layerwise: bool, hold_s: float = 60) -> Iterator[Pair]:
    registry = LoopbackRegistry()
    p_kvbm, d_kvbm = _kvbm(tiny_dir), _kvbm(tiny_dir)
    p_agent, d_agent = LoopbackAgent("prefill", registry), LoopbackAgent("decode", registry)
    try:
        p_agent.register(p_kvbm.storage().buffers())
        d_agent.register(d_kvbm.storage().buffers())
        decode = Decode(d_kvbm, d_agent, DecodeStreams(DecodeHandoff(d_kvbm, d_agent, timeout_s=5)))
        handoff = PrefillHandoff(p_kvbm, p_agent, hold_timeout_s=hold_s)
        metrics = WorkerMetrics(p_kvbm.metrics.registry, role="prefill", worker_id="p", model="m")
        service = PrefillService(
            Engine(tiny_dir, p_kvbm), handoff, decode, metrics, max_waiting=4, layerwise=layerwise
        )
        yield Pair(p_kvbm, handoff, service, decode, registry)
        service.close()
        decode.streams.close()
    finally:
        d_agent.close()
        p_agent.close()
        d_kvbm.close()
        p_kvbm.close()


@pytest.fixture
def pair(tiny_dir: Path) -> Iterator[Pair]:
    yield from _make_pair(tiny_dir, layerwise=True)


@pytest.fixture
def short_hold_pair(tiny_dir: Path) -> Iterator[Pair]:
    yield from _make_pair(tiny_dir, layerwise=True, hold_s=SHORT_HOLD_S)


@pytest.fixture
def whole_pair(tiny_dir: Path) -> Iterator[Pair]:
    yield from _make_pair(tiny_dir, layerwise=False)


def _block_bytes(kvbm: KvBlockManager, block: int) -> bytes:
    storage = kvbm.storage()
    assert isinstance(storage, TensorStorage)
    layout = storage.layout
    return b"".join(
        storage.block_view(block, layer, outer).contiguous().view(torch.uint8).numpy().tobytes()
        for layer in range(layout.num_layers)
        for outer in range(layout.outer_dim)
    )


def _prefill(pair: Pair, length: int, *, ask: bool) -> list[int]:
    prompt = torch.randint(2, 1024, (length,), generator=torch.Generator().manual_seed(length))
    tokens = prompt.tolist()
    seq = SequenceBlocks.open(pair.decode.kvbm, tokens)
    assert seq.reserve(length)
    pair.decode.seq = seq
    sampling: dict[str, float | int | str | bool] = {LAYERWISE_OPTION: True} if ask else {}
    request = PrefillRequest("req-1", tokens, 4, DECODE, sampling, 0)
    pair.service.submit(request, DECODE, 0.0)
    assert pair.service.step()
    return tokens


def _offered_ids(pair: Pair) -> tuple[int, ...]:
    (ready,) = [m for m in pair.decode.pushed if isinstance(m, BlocksReady)]
    return RemoteBlockSet.from_bytes(ready.block_set).block_ids


@pytest.mark.parametrize("length", [37, 200])
def test_layerwise_blocks_equal_the_prefills_byte_for_byte(pair: Pair, length: int) -> None:
    _prefill(pair, length, ask=True)
    kinds = [type(m) for m in pair.decode.pushed]
    num_layers = pair.prefill_kvbm.storage().layout.num_layers
    assert kinds == [KvStream] + [KvLayers] * num_layers + [TokenChunk, BlocksReady]
    assert pair.decode.finished is not None
    finished = pair.decode.finished
    assert finished.start == 0
    assert finished.num_early_reads == num_layers  # one READ per layer, during the forward
    assert finished.read_ms > 0
    seq = pair.decode.seq
    assert seq is not None
    for mine, theirs in zip(seq.block_table, _offered_ids(pair), strict=False):
        assert _block_bytes(pair.decode.kvbm, mine) == _block_bytes(pair.prefill_kvbm, theirs)
    assert pair.decode.agent.num_live_transfers == 0
    pair.service.complete(TransferDone("req-1", len(_offered_ids(pair))))
    seq.release()
    assert pair.prefill_kvbm.pool().stats().num_in_use == 0
    assert pair.decode.kvbm.pool().stats().num_in_use == 0


@pytest.mark.parametrize("who", ["prefill", "decode"])
def test_whole_offer_when_either_side_does_not_take_layers(
    pair: Pair, whole_pair: Pair, who: str
) -> None:
    used = whole_pair if who == "prefill" else pair
    _prefill(used, 37, ask=who == "prefill")  # the decode asks unless it is the one that won't
    assert [type(m) for m in used.decode.pushed] == [TokenChunk, BlocksReady]
    assert used.decode.finished is None  # no stream: the caller reads the offer whole
    used.service.abort("req-1")
    assert used.prefill_kvbm.pool().stats().num_in_use == 0


def test_prefill_gone_mid_stream_leaves_nothing_in_flight(pair: Pair) -> None:
    """The prefill's agent goes away after the first layer: the next READ fails, the stream is
    cancelled and forgotten, and the decode's blocks are the caller's to recompute into."""
    decode = pair.decode
    original = decode.send
    failures: list[Exception] = []

    def send(peer: str, message: Message) -> None:
        if isinstance(message, KvLayers) and message.num_layers == 2:
            pair.registry.detach("prefill")  # the prefill's agent is gone
        try:
            original(peer, message)
        except PeerUnavailable as exc:
            failures.append(exc)

    decode.send = send  # type: ignore[method-assign]
    _prefill(pair, 200, ask=True)
    assert failures and "req-1" not in decode.streams
    assert decode.agent.num_live_transfers == 0
    pair.service.abort("req-1")
    assert pair.prefill_kvbm.pool().stats().num_in_use == 0


def test_a_repeated_stream_replaces_the_first_without_leaking(pair: Pair) -> None:
    tokens = _prefill(pair, 37, ask=True)
    (stream,) = [m for m in pair.decode.pushed if isinstance(m, KvStream)]
    decode, seq = pair.decode, pair.decode.seq
    assert seq is not None
    pair.registry.pause("prefill")  # READs stay in flight
    done = KvStream(stream.request_id, stream.agent_name, stream.block_set, len(tokens), 32)
    for _ in range(2):
        decode.streams.begin(done, 0, seq.block_table[:3])  # blocks 0-1 are readable at once
        assert decode.agent.num_live_transfers == 1
    decode.streams.cancel(stream.request_id)
    assert decode.agent.num_live_transfers == 0 and len(decode.streams) == 0
    pair.registry.resume("prefill")
    pair.service.abort("req-1")


def _slow_prefill(pair: Pair, on_first_layer: Callable[[], None] | None = None) -> float:
    """A prefill whose compute outlasts the hold timeout (it sleeps through it at the first
    layer); returns ``time.monotonic()`` at its last layer, after the compute's hold time."""
    decode = pair.decode
    original = decode.send
    last_layer = [0.0]
    num_layers = pair.prefill_kvbm.storage().layout.num_layers

    def send(peer: str, message: Message) -> None:
        if isinstance(message, KvLayers) and message.num_layers == 1:
            time.sleep(2 * SHORT_HOLD_S)
            if on_first_layer is not None:
                on_first_layer()
        if isinstance(message, KvLayers) and message.num_layers == num_layers:
            last_layer[0] = time.monotonic()
        original(peer, message)

    decode.send = send  # type: ignore[method-assign]
    _prefill(pair, 200, ask=True)
    return last_layer[0]


def test_a_prefill_longer_than_the_hold_timeout_keeps_its_hold(short_hold_pair: Pair) -> None:
    """The hold was taken before a compute longer than ``hold_timeout_s``: at the end of the
    compute it is still held (its deadline counts from ``BlocksReady``), the decode's blocks
    arrive, and its release frees them; unreleased, the deadline after the offer frees them."""
    pair = short_hold_pair
    last_layer = _slow_prefill(pair)
    assert pair.handoff.expire(last_layer) == []  # a deadline from the hold would have passed
    assert pair.decode.finished is not None and pair.handoff.num_held == 1
    assert pair.prefill_kvbm.pool().stats().num_in_use > 0
    seq = pair.decode.seq
    assert seq is not None
    for mine, theirs in zip(seq.block_table, _offered_ids(pair), strict=False):
        assert _block_bytes(pair.decode.kvbm, mine) == _block_bytes(pair.prefill_kvbm, theirs)
    assert pair.handoff.complete(TransferDone("req-1", len(_offered_ids(pair))))
    assert pair.prefill_kvbm.pool().stats().num_in_use == 0
    seq.release()


def test_an_unreleased_slow_prefill_still_expires_after_its_offer(short_hold_pair: Pair) -> None:
    pair = short_hold_pair
    _slow_prefill(pair)
    assert pair.handoff.num_held == 1
    assert pair.handoff.expire(time.monotonic() + SHORT_HOLD_S) == ["req-1"]
    assert pair.prefill_kvbm.pool().stats().num_in_use == 0
    assert pair.decode.seq is not None
    pair.decode.seq.release()


def test_a_decode_that_left_during_a_slow_prefill_frees_its_hold(short_hold_pair: Pair) -> None:
    """The decode's record leaves the directory while the prefill computes its prompt: the next
    step drops the hold at once, long before any deadline."""
    pair = short_hold_pair
    record = WorkerRecord(
        worker_id=DECODE,
        role=Role.DECODE,
        endpoints=Endpoints(signal="tcp://127.0.0.1:5555"),
        agent_name="decode",
        layout=FabricLayout(block_size=BLOCK, dtype="float32"),
        compat_hash=0xC0FFEE,
        started_at=time.time(),
    )
    left = WorkerEvent(WorkerEventKind.LEFT, record)
    _slow_prefill(pair, lambda: pair.service.on_worker_change(left))
    assert pair.handoff.num_held == 1  # the scheduler thread has not seen the LEFT yet
    pair.service.step()
    assert pair.handoff.num_held == 0
    assert pair.prefill_kvbm.pool().stats().num_in_use == 0
    assert pair.decode.seq is not None
    pair.decode.seq.release()
