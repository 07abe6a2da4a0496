"""NIXL's own telemetry folded into ``fabric.transfer.metrics``: real transfers between two NIXL
agents of this process (UCX on loopback) move the bytes, seconds and descriptor series by what
NIXL reports; a transfer to an unknown peer and one cancelled by a timed-out wait count as
errors of their kind."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from fabric.errors import PeerUnavailable, TransferTimeout
from fabric.transfer import AgentConfig, BufferInfo, MemoryKind, RegionList
from fabric.transfer.metrics import REGISTRY
from fabric.transfer.nixl_agent import NixlAgent

pytestmark = pytest.mark.nixl

NBYTES = 1 << 20
NUM_PIECES = 8


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Pair:
    """Two agents with one DRAM buffer each, knowing each other."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, tcp_only: bool = False) -> None:
        monkeypatch.setenv("UCX_NET_DEVICES", "lo")
        if tcp_only:  # the target never polls: a READ over TCP cannot complete
            monkeypatch.setenv("UCX_TLS", "tcp")
        self.buffers = [np.full(NBYTES, i, dtype=np.uint8) for i in (1, 2)]
        self.agents = [NixlAgent(f"{n}-{uuid.uuid4().hex[:6]}") for n in ("init", "target")]
        for agent, buf in zip(self.agents, self.buffers, strict=True):
            agent.register([BufferInfo(buf.ctypes.data, buf.nbytes, MemoryKind.DRAM, 0, None)])
        self.agents[0].add_peer(self.agents[1].metadata())
        self.agents[1].add_peer(self.agents[0].metadata())

    def regions(self, side: int) -> RegionList:
        """The buffer in ``NUM_PIECES`` scattered pieces (every other piece of its first half)."""
        piece = NBYTES // (2 * NUM_PIECES)
        offsets = np.arange(NUM_PIECES) * 2 * piece
        return RegionList.build(
            MemoryKind.DRAM,
            self.buffers[side].ctypes.data + offsets,
            np.full(NUM_PIECES, piece),
        )

    def close(self) -> None:
        for agent in reversed(self.agents):
            agent.close()


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    made = Pair(monkeypatch)
    try:
        yield made
    finally:
        made.close()


def test_a_completed_read_moves_bytes_seconds_and_descriptors(pair: Pair) -> None:
    before = {
        "bytes": sample("fabric_nixl_transfer_bytes_total", op="READ", backend="UCX"),
        "count": sample("fabric_nixl_transfer_seconds_count", op="READ", backend="UCX"),
        "descs": sample("fabric_nixl_transfer_descriptors_total", op="READ"),
        "done": sample("fabric_nixl_transfers_total", op="READ", outcome="done"),
    }
    init, target = pair.agents
    transfer = init.read(pair.regions(0), pair.regions(1), target.name)
    init.wait(transfer, timeout_s=10.0)
    assert pair.buffers[0][0] == 2  # the bytes moved
    moved = NBYTES // 2
    assert sample("fabric_nixl_transfer_bytes_total", op="READ", backend="UCX") == (
        before["bytes"] + moved
    )
    assert sample("fabric_nixl_transfer_seconds_count", op="READ", backend="UCX") == (
        before["count"] + 1
    )
    assert sample("fabric_nixl_transfer_seconds_sum", op="READ", backend="UCX") >= 0
    descs = sample("fabric_nixl_transfer_descriptors_total", op="READ") - before["descs"]
    assert 1 <= descs <= NUM_PIECES  # NIXL's count, after any merging of its own
    assert sample("fabric_nixl_transfers_total", op="READ", outcome="done") == before["done"] + 1


def test_without_nixl_telemetry_the_agents_own_figures_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    buffers = [np.full(NBYTES, i, dtype=np.uint8) for i in (1, 2)]
    agents = [
        NixlAgent(f"{n}-{uuid.uuid4().hex[:6]}", AgentConfig(telemetry=False))
        for n in ("plain-init", "plain-target")
    ]
    try:
        for agent, buf in zip(agents, buffers, strict=True):
            agent.register([BufferInfo(buf.ctypes.data, buf.nbytes, MemoryKind.DRAM, 0, None)])
        agents[0].add_peer(agents[1].metadata())
        before = sample("fabric_nixl_transfer_bytes_total", op="WRITE", backend="UCX")
        local = RegionList.build(MemoryKind.DRAM, np.array([buffers[0].ctypes.data]), [4096])
        remote = RegionList.build(MemoryKind.DRAM, np.array([buffers[1].ctypes.data]), [4096])
        agents[0].wait(agents[0].write(local, remote, agents[1].name), timeout_s=10.0)
        assert sample("fabric_nixl_transfer_bytes_total", op="WRITE", backend="UCX") == (
            before + 4096
        )
    finally:
        for agent in reversed(agents):
            agent.close()


def test_an_unknown_peer_counts_as_peer_unavailable(pair: Pair) -> None:
    before = sample("fabric_nixl_transfer_errors_total", op="READ", kind="peer_unavailable")
    with pytest.raises(PeerUnavailable):
        pair.agents[0].read(pair.regions(0), pair.regions(1), "nobody")
    after = sample("fabric_nixl_transfer_errors_total", op="READ", kind="peer_unavailable")
    assert after == before + 1


def test_a_timed_out_wait_counts_as_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    stalled = Pair(monkeypatch, tcp_only=True)
    try:
        before = sample("fabric_nixl_transfer_errors_total", op="READ", kind="cancelled")
        init, target = stalled.agents
        transfer = init.read(stalled.regions(0), stalled.regions(1), target.name)
        with pytest.raises(TransferTimeout):
            init.wait(transfer, timeout_s=0.2)
        after = sample("fabric_nixl_transfer_errors_total", op="READ", kind="cancelled")
        assert after == before + 1
    finally:
        stalled.close()
