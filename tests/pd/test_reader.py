"""The consumer's reader: offers sliced, read byte-exact, the producer's metadata loaded once and
forgotten after a failed transfer (loopback agents)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fabric.errors import InvalidInput, PeerUnavailable, ProtocolMismatch
from fabric.kvbm import LayoutKind, LayoutSpec, TensorStorage, host_storage
from fabric.pd import BlockExporter, RemoteReader
from fabric.transfer import LoopbackAgent, LoopbackRegistry

COMPAT = 0x5EED
LAYOUT = LayoutSpec(
    LayoutKind.FULLY_CONTIGUOUS,
    8,
    num_layers=2,
    outer_dim=2,
    block_size=4,
    inner_dim=8,
    dtype=torch.float16,
)


class CountingAgent(LoopbackAgent):
    """Counts peer loads and removals."""

    def __init__(self, name: str, registry: LoopbackRegistry) -> None:
        super().__init__(name, registry)
        self.added: list[str] = []
        self.removed: list[str] = []

    def add_peer(self, metadata: bytes) -> str:
        name = super().add_peer(metadata)
        self.added.append(name)
        return name

    def remove_peer(self, name: str) -> None:
        self.removed.append(name)
        super().remove_peer(name)


def _rows(storage: TensorStorage) -> np.ndarray:
    return storage.tensors[0].view(torch.uint8).numpy().reshape(LAYOUT.num_blocks, -1)


@pytest.fixture
def registry() -> LoopbackRegistry:
    return LoopbackRegistry()


@pytest.fixture
def producer(registry: LoopbackRegistry) -> Iterator[tuple[LoopbackAgent, TensorStorage]]:
    agent = LoopbackAgent("producer", registry)
    storage = host_storage(LAYOUT)
    _rows(storage)[:] = np.arange(LAYOUT.num_blocks, dtype=np.uint8)[:, None] + 1
    agent.register(storage.buffers())
    yield agent, storage
    agent.close()


@pytest.fixture
def consumer(registry: LoopbackRegistry) -> Iterator[tuple[CountingAgent, RemoteReader]]:
    agent = CountingAgent("consumer", registry)
    storage = host_storage(LAYOUT)
    _rows(storage)[:] = 0
    agent.register(storage.buffers())
    yield agent, RemoteReader(agent, storage, compat_hash=COMPAT, timeout_s=2.0)
    agent.close()


def test_a_slice_of_the_offer_lands_in_the_given_blocks_and_the_peer_loads_once(
    producer, consumer
) -> None:
    agent, reader = consumer
    exporter = BlockExporter(producer[1], producer[0], compat_hash=COMPAT)
    ready = exporter.ready("r", [5, 6, 7, 1], first_token=9, num_tokens=16)
    offer = reader.block_set(ready)
    reader.read(offer, [0, 3], start=2)
    reader.read(offer, [4], start=0)
    rows = _rows(reader.storage)
    assert rows[0].tolist() == [8] * rows.shape[1]  # offered block 7 (filled with 7 + 1)
    assert rows[3].tolist() == [2] * rows.shape[1]  # offered block 1
    assert rows[4].tolist() == [6] * rows.shape[1]  # offered block 5
    assert not rows[[1, 2, 5, 6, 7]].any()
    assert agent.added == ["producer"]  # one metadata load for both reads
    with pytest.raises(InvalidInput, match=r"blocks 3\.\.4"):
        reader.read(offer, [1, 2], start=3)


def test_an_empty_read_only_notifies(producer, consumer) -> None:
    _, reader = consumer
    offer = BlockExporter(producer[1], producer[0], compat_hash=COMPAT).block_set([])
    reader.read(offer, [], notify=b"done")
    assert producer[0].notifications() == [("consumer", b"done")]


def test_an_offer_naming_another_agent_is_refused(producer, consumer) -> None:
    _, reader = consumer
    exporter = BlockExporter(producer[1], producer[0], compat_hash=COMPAT)
    ready = exporter.ready("r", [1], first_token=0, num_tokens=4)
    with pytest.raises(ProtocolMismatch, match="names agent 'someone'"):
        reader.block_set(dataclasses.replace(ready, agent_name="someone"))
    forged = dataclasses.replace(reader.block_set(ready), agent_name="someone-else")
    with pytest.raises(ProtocolMismatch, match="someone-else"):
        reader.read(forged, [0])


def test_a_failed_transfer_forgets_the_peer_and_the_next_offer_loads_it_again(
    registry, producer, consumer
) -> None:
    agent, reader = consumer
    offer = BlockExporter(producer[1], producer[0], compat_hash=COMPAT).block_set([1, 2])
    reader.read(offer, [0, 1])
    producer[0].close()  # the producer dies
    with pytest.raises(PeerUnavailable):
        reader.read(offer, [0, 1])
    assert agent.removed == ["producer"]
    restarted = LoopbackAgent("producer", registry)
    storage = host_storage(LAYOUT)
    _rows(storage)[:] = 42
    restarted.register(storage.buffers())
    reader.read(BlockExporter(storage, restarted, compat_hash=COMPAT).block_set([3]), [5])
    assert agent.added == ["producer", "producer"]
    assert _rows(reader.storage)[5].tolist() == [42] * LAYOUT.block_bytes
    restarted.close()


def test_another_compatibility_hash_is_refused_before_any_transfer(producer, consumer) -> None:
    agent, reader = consumer
    offer = BlockExporter(producer[1], producer[0], compat_hash=COMPAT + 1).block_set([1])
    with pytest.raises(ProtocolMismatch, match="compatibility hash"):
        reader.read(offer, [0])
    assert agent.added == []
