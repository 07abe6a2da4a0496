"""Layer-wise reads: the frontier arithmetic, and a consumer reading while a producer writes layer
by layer, chunk by chunk (loopback agents, which copy at post time: a READ posted before its layer
was written copies stale bytes, so the byte comparison fails if readiness runs ahead)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fabric.errors import InvalidInput, PeerUnavailable
from fabric.kvbm import LayoutKind, LayoutSpec, TensorStorage, host_storage
from fabric.pd import BlockExporter, KvFrontier, LayerwiseRead, RemoteReader, layers_ready
from fabric.transfer import LoopbackAgent, LoopbackRegistry

COMPAT = 0x1A7E
NUM_LAYERS = 3
BLOCK = 4


def spec(kind: LayoutKind, alignment: int = 1) -> LayoutSpec:
    return LayoutSpec(
        kind,
        16,
        num_layers=NUM_LAYERS,
        outer_dim=2,
        block_size=BLOCK,
        inner_dim=8,
        dtype=torch.float16,
        alignment=alignment,
    )


# -- the frontier --------------------------------------------------------------------------------


def test_layers_ready_by_block() -> None:
    # 10 tokens in blocks of 4: blocks end at 4, 8, 10.
    ready = lambda f: layers_ready(f, num_tokens=10, block_size=4, num_layers=3).tolist()  # noqa: E731
    assert ready(KvFrontier(0, 0, 0)) == [0, 0, 0]
    assert ready(KvFrontier(0, 10, 1)) == [1, 1, 1]  # the whole prompt as one chunk, layer 0
    assert ready(KvFrontier(0, 6, 2)) == [2, 0, 0]  # block 1 straddles the chunk end: waits
    assert ready(KvFrontier(6, 10, 1)) == [3, 1, 1]  # block 1 holds 4..5 (all) and 6..7 (1)
    assert ready(KvFrontier(8, 8, 0)) == [3, 3, 0]
    assert ready(KvFrontier.complete(10)) == [3, 3, 3]


@pytest.mark.parametrize(
    "frontier", [KvFrontier(0, 11, 1), KvFrontier(0, 10, 4)], ids=["tokens", "layers"]
)
def test_frontier_past_the_prompt_is_refused(frontier: KvFrontier) -> None:
    with pytest.raises(InvalidInput, match="past the prompt"):
        layers_ready(frontier, num_tokens=10, block_size=4, num_layers=3)


def test_frontier_fields_are_checked() -> None:
    with pytest.raises(InvalidInput):
        KvFrontier(5, 4, 0)


# -- a producer writing while the consumer reads ---------------------------------------------------


class Producer:
    """A storage written position range by position range, layer by layer, like the engine."""

    def __init__(self, storage: TensorStorage, block_ids: list[int], seed: int) -> None:
        for tensor in storage.tensors:  # the engine's pool is zeroed at creation too
            tensor.zero_()
        self.storage = storage
        self.block_ids = block_ids
        rng = np.random.default_rng(seed)
        layout = storage.layout
        self.final = rng.standard_normal(
            (NUM_LAYERS, 2, len(block_ids) * BLOCK, layout.inner_dim)
        ).astype(np.float16)

    def write(self, layer: int, start: int, end: int) -> None:
        for outer in range(2):
            for position in range(start, end):
                block = self.block_ids[position // BLOCK]
                view = self.storage.block_view(block, layer, outer)
                view[position % BLOCK] = torch.from_numpy(self.final[layer, outer, position])

    def expected(self, index: int, layer: int, outer: int, num_tokens: int) -> np.ndarray:
        rows = self.final[layer, outer, index * BLOCK : (index + 1) * BLOCK].copy()
        rows[max(0, num_tokens - index * BLOCK) :] = 0  # positions past the prompt stay zero
        return rows


@pytest.fixture
def registry() -> LoopbackRegistry:
    return LoopbackRegistry()


@pytest.fixture
def agents(registry: LoopbackRegistry) -> Iterator[tuple[LoopbackAgent, LoopbackAgent]]:
    producer, consumer = LoopbackAgent("producer", registry), LoopbackAgent("consumer", registry)
    yield producer, consumer
    consumer.close()
    producer.close()


def _setup(agents, remote_kind: LayoutKind, local_kind: LayoutKind, num_tokens: int, start: int):
    producer_agent, consumer_agent = agents
    remote_storage = host_storage(spec(remote_kind))
    producer_agent.register(remote_storage.buffers())
    num_blocks = -(-num_tokens // BLOCK)
    remote_ids = list(range(15, 15 - num_blocks, -1))  # descending: one region per block
    producer = Producer(remote_storage, remote_ids, seed=num_tokens)
    local_storage = host_storage(spec(local_kind, alignment=64))
    consumer_agent.register(local_storage.buffers())
    reader = RemoteReader(consumer_agent, local_storage, compat_hash=COMPAT, timeout_s=5.0)
    offer = BlockExporter(remote_storage, producer_agent, compat_hash=COMPAT).block_set(remote_ids)
    local_ids = list(range(2, 2 + num_blocks - start))
    read = LayerwiseRead(reader, offer, local_ids, start=start, num_tokens=num_tokens)
    return producer, local_storage, local_ids, read


def _check(producer: Producer, local: TensorStorage, local_ids, start: int, num_tokens: int):
    for i, block in enumerate(local_ids):
        for layer in range(NUM_LAYERS):
            for outer in range(2):
                got = local.block_view(block, layer, outer).numpy()
                want = producer.expected(start + i, layer, outer, num_tokens)
                assert np.array_equal(got, want), (start + i, layer, outer)


CHUNKINGS = {"whole": [(0, 37)], "chunks": [(0, 10), (10, 22), (22, 37)]}
KINDS = {
    "fc->fc": (LayoutKind.FULLY_CONTIGUOUS, LayoutKind.FULLY_CONTIGUOUS),
    "ls->ls": (LayoutKind.LAYER_SEPARATE, LayoutKind.LAYER_SEPARATE),
    "fc->ls": (LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE),
}


@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("kinds", KINDS)
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_reads_follow_the_producer_byte_exact(agents, chunking: str, kinds: str, start) -> None:
    num_tokens = 37
    producer, local, local_ids, read = _setup(agents, *KINDS[kinds], num_tokens, start)
    for begin, end in CHUNKINGS[chunking]:
        for layer in range(NUM_LAYERS):
            producer.write(layer, begin, end)
            read.advance(KvFrontier(begin, end, layer + 1))  # said after the write, as the engine
            assert read.poll()
    read.finish()
    assert read.complete
    _check(producer, local, local_ids, start, num_tokens)
    # each (block, layer) read once: no read of a block straddling a chunk end before it is final
    assert read.num_reads <= len(CHUNKINGS[chunking]) * NUM_LAYERS * 2 + 1


def test_readiness_ahead_of_the_writes_is_caught(agents) -> None:
    """The control: a frontier announced before its layer is written reads stale bytes."""
    producer, local, local_ids, read = _setup(
        agents, LayoutKind.FULLY_CONTIGUOUS, LayoutKind.FULLY_CONTIGUOUS, 37, 0
    )
    for layer in range(NUM_LAYERS):
        read.advance(KvFrontier(0, 37, layer + 1))  # announced first ...
        producer.write(layer, 0, 37)  # ... written after
    read.finish()
    with pytest.raises(AssertionError):
        _check(producer, local, local_ids, 0, 37)


def test_nothing_left_in_flight_after_a_failure(agents) -> None:
    producer_agent, consumer_agent = agents
    producer, _, _, read = _setup(
        agents, LayoutKind.FULLY_CONTIGUOUS, LayoutKind.FULLY_CONTIGUOUS, 37, 0
    )
    producer.write(0, 0, 37)
    read.advance(KvFrontier(0, 37, 1))
    producer_agent.close()  # the producer dies mid-stream
    with pytest.raises(PeerUnavailable):
        read.advance(KvFrontier(0, 37, 2))
    assert read.num_in_flight == 0
    assert consumer_agent.num_live_transfers == 0


def test_cancel_releases_stalled_reads(agents, registry: LoopbackRegistry) -> None:
    _, consumer_agent = agents
    _, _, _, read = _setup(agents, LayoutKind.FULLY_CONTIGUOUS, LayoutKind.FULLY_CONTIGUOUS, 37, 0)
    registry.pause("producer")
    read.advance(KvFrontier(0, 37, 1))
    assert not read.poll() and read.num_in_flight == 1
    read.cancel()
    assert read.num_in_flight == 0 and consumer_agent.num_live_transfers == 0
    registry.resume("producer")


def test_local_blocks_must_cover_the_rest_of_the_prompt(agents) -> None:
    producer_agent, consumer_agent = agents
    storage = host_storage(spec(LayoutKind.FULLY_CONTIGUOUS))
    producer_agent.register(storage.buffers())
    offer = BlockExporter(storage, producer_agent, compat_hash=COMPAT).block_set([1, 2, 3])
    reader = RemoteReader(consumer_agent, storage, compat_hash=COMPAT, timeout_s=1.0)
    with pytest.raises(InvalidInput, match="local blocks"):
        LayerwiseRead(reader, offer, [4, 5], start=0, num_tokens=10)
