"""One contract suite over every TransferAgent: the loopback fake and the real NIXL agent.

NIXL allows several agents in one process over UCX (shared memory / CMA on one host), so both
implementations run as two agents in this process. The stalled peer of the timeout tests is, for
NIXL, a pair built with ``UCX_TLS=tcp`` whose target never polls (its progress thread is off, so
a READ over TCP cannot complete); for the loopback, a paused agent. Dead peers across processes
are in ``test_two_process.py``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fabric.errors import (
    ConfigError,
    InvalidInput,
    InvalidTransition,
    PeerUnavailable,
    TransferError,
    TransferTimeout,
)
from fabric.transfer import (
    AgentConfig,
    BufferInfo,
    LoopbackAgent,
    LoopbackRegistry,
    MemoryKind,
    RegionList,
    TransferAgent,
    TransferState,
    pair_coalesce,
)

BUF_BYTES = 1 << 20
SENTINEL = 0xAB
IMPLS = ["loopback", pytest.param("nixl", marks=pytest.mark.nixl)]


@dataclass
class Side:
    """An agent with one registered DRAM buffer."""

    agent: TransferAgent
    buf: np.ndarray

    def regions(self, offsets: np.ndarray, lengths: np.ndarray) -> RegionList:
        return RegionList.build(MemoryKind.DRAM, self.buf.ctypes.data + offsets, lengths)


class Factory:
    """Builds agents of one implementation and closes them all at teardown."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.registry = LoopbackRegistry()
        self.agents: list[TransferAgent] = []
        self.buffers: list[np.ndarray] = []

    def agent(self, name: str, *, tcp_only: bool = False) -> TransferAgent:
        if self.kind == "loopback":
            agent: TransferAgent = LoopbackAgent(f"{name}-{uuid.uuid4().hex[:6]}", self.registry)
        else:
            from fabric.transfer.nixl_agent import NixlAgent

            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("UCX_NET_DEVICES", "lo")
                if tcp_only:
                    mp.setenv("UCX_TLS", "tcp")
                agent = NixlAgent(f"{name}-{uuid.uuid4().hex[:6]}")
        self.agents.append(agent)
        return agent

    def side(self, name: str, *, tcp_only: bool = False, seed: int = 0) -> Side:
        buf = np.random.default_rng(seed).integers(0, 256, BUF_BYTES, dtype=np.uint8)
        self.buffers.append(buf)
        agent = self.agent(name, tcp_only=tcp_only)
        agent.register([BufferInfo(buf.ctypes.data, buf.nbytes, MemoryKind.DRAM, 0, None)])
        return Side(agent, buf)

    def pair(self, *, stalled: bool = False) -> tuple[Side, Side]:
        """(initiator, target), each knowing the other; a stalled target never progresses."""
        tcp_only = stalled and self.kind == "nixl"
        init = self.side("decode", tcp_only=tcp_only, seed=1)
        target = self.side("prefill", tcp_only=tcp_only, seed=2)
        init.agent.add_peer(target.agent.metadata())
        target.agent.add_peer(init.agent.metadata())
        if stalled and self.kind == "loopback":
            self.registry.pause(target.agent.name)
        return init, target

    def close(self) -> None:
        for agent in reversed(self.agents):
            agent.close()


@pytest.fixture(scope="module", params=IMPLS)
def factory(request: pytest.FixtureRequest) -> Iterator[Factory]:
    f = Factory(request.param)
    yield f
    f.close()


@pytest.fixture(scope="module")
def pair(factory: Factory) -> tuple[Side, Side]:
    return factory.pair()


def wait_notifications(agent: TransferAgent, count: int, timeout_s: float = 5.0) -> list:
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += agent.notifications()
    return got


# Region shapes: (local offsets, remote offsets, lengths).
def _one() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array([0]), np.array([0]), np.array([BUF_BYTES])


def _scattered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = 64
    perm = np.random.default_rng(7).permutation(n)
    return np.arange(n) * 8192, perm * 8192 + 100, np.full(n, 4096)


def _coalesced_runs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = 48  # remote contiguous; local has a gap every 16 pieces: three pairs once coalesced
    piece = np.arange(n) * 1024
    return piece + (np.arange(n) // 16) * 4096, piece + 300_000, np.full(n, 1024)


def _odd() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([1, 7, 1001, 70_001]),
        np.array([3, 99_999, 5, 500_003]),
        np.array([1, 3, 17, 4095]),
    )


SHAPES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "one": _one,
    "scattered": _scattered,
    "coalesced_runs": _coalesced_runs,
    "odd": _odd,
}


def _check_moved(dst: np.ndarray, before: np.ndarray, src: np.ndarray, *, offsets) -> None:
    dst_off, src_off, lens = offsets
    expected = before.copy()
    for d, s, n in zip(dst_off.tolist(), src_off.tolist(), lens.tolist(), strict=True):
        expected[d : d + n] = src[s : s + n]
    assert np.array_equal(dst, expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_read_moves_remote_regions_into_local(pair, shape: str) -> None:
    init, target = pair
    local_off, remote_off, lens = SHAPES[shape]()
    init.buf[:] = SENTINEL
    before = init.buf.copy()
    local, remote = init.regions(local_off, lens), target.regions(remote_off, lens)
    if shape == "coalesced_runs":
        local, remote = pair_coalesce(local, remote)
        assert len(local) == 3
    transfer = init.agent.read(local, remote, target.agent.name)
    assert transfer.nbytes == int(lens.sum())
    init.agent.wait(transfer, timeout_s=10)
    assert transfer.state is TransferState.DONE and transfer.released
    _check_moved(init.buf, before, target.buf, offsets=(local_off, remote_off, lens))


@pytest.mark.parametrize("shape", SHAPES)
def test_write_moves_local_regions_to_remote(pair, shape: str) -> None:
    init, target = pair
    local_off, remote_off, lens = SHAPES[shape]()
    init.buf[:] = np.random.default_rng(3).integers(0, 256, BUF_BYTES, dtype=np.uint8)
    before = target.buf.copy()
    transfer = init.agent.write(
        init.regions(local_off, lens), target.regions(remote_off, lens), target.agent.name
    )
    init.agent.wait(transfer, timeout_s=10)
    _check_moved(target.buf, before, init.buf, offsets=(remote_off, local_off, lens))


def test_add_peer_is_idempotent_and_names_the_peer(pair) -> None:
    init, target = pair
    assert init.agent.add_peer(target.agent.metadata()) == target.agent.name


def test_transfer_to_self(pair) -> None:
    init, _ = pair
    init.buf[:] = np.arange(BUF_BYTES, dtype=np.uint64).astype(np.uint8)
    lens = np.array([4096, 100])
    transfer = init.agent.read(
        init.regions(np.array([0, 8192]), lens),
        init.regions(np.array([500_000, 700_001]), lens),
        init.agent.name,
    )
    init.agent.wait(transfer, timeout_s=10)
    assert np.array_equal(init.buf[:4096], init.buf[500_000:504_096])
    assert np.array_equal(init.buf[8192:8292], init.buf[700_001:700_101])


def test_file_regions_round_trip(pair, tmp_path: Path) -> None:
    init, _ = pair
    agent, name = init.agent, init.agent.name
    path = tmp_path / "blocks.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 1 << 16)
        registration = agent.register([BufferInfo(0, 1 << 16, MemoryKind.FILE, fd, str(path))])
        init.buf[:8192] = np.random.default_rng(5).integers(0, 256, 8192, dtype=np.uint8)
        lens = np.array([4096, 4096])
        file_regions = RegionList.build(MemoryKind.FILE, [32768, 4096], lens, fd)
        agent.wait(agent.write(init.regions(np.array([0, 4096]), lens), file_regions, name), 10)
        assert os.pread(fd, 4096, 32768) == init.buf[:4096].tobytes()
        agent.wait(
            agent.read(init.regions(np.array([100_000, 200_000]), lens), file_regions, name), 10
        )
        assert np.array_equal(init.buf[100_000:104_096], init.buf[:4096])
        assert np.array_equal(init.buf[200_000:204_096], init.buf[4096:8192])
        agent.deregister(registration)
    finally:
        os.close(fd)


def test_transfer_notification_arrives_with_the_bytes(pair) -> None:
    init, target = pair
    target.agent.notifications()
    lens = np.array([4096])
    transfer = init.agent.read(
        init.regions(np.array([0]), lens),
        target.regions(np.array([0]), lens),
        target.agent.name,
        notify=b"req-1 done",
    )
    init.agent.wait(transfer, timeout_s=10)
    assert wait_notifications(target.agent, 1) == [(init.agent.name, b"req-1 done")]
    plain = init.agent.read(
        init.regions(np.array([0]), lens), target.regions(np.array([0]), lens), target.agent.name
    )
    init.agent.wait(plain, timeout_s=10)
    assert wait_notifications(target.agent, 1, timeout_s=0.05) == []


def test_send_notification_both_ways(pair) -> None:
    init, target = pair
    init.agent.send_notification(target.agent.name, b"ping")
    assert wait_notifications(target.agent, 1) == [(init.agent.name, b"ping")]
    target.agent.send_notification(init.agent.name, b"pong")
    assert wait_notifications(init.agent, 1) == [(target.agent.name, b"pong")]
    with pytest.raises(InvalidInput):
        init.agent.send_notification(target.agent.name, "text")  # type: ignore[arg-type]


def test_unknown_peer_is_unavailable(pair) -> None:
    init, target = pair
    lens = np.array([64])
    local, remote = init.regions(np.array([0]), lens), target.regions(np.array([0]), lens)
    with pytest.raises(PeerUnavailable, match="nobody"):
        init.agent.read(local, remote, "nobody")
    with pytest.raises(PeerUnavailable, match="nobody"):
        init.agent.write(local, remote, "nobody")
    with pytest.raises(PeerUnavailable):
        init.agent.send_notification("nobody", b"x")
    with pytest.raises(PeerUnavailable):
        init.agent.remove_peer("nobody")
    assert init.agent.num_live_transfers == 0


def test_bad_metadata_is_refused(pair) -> None:
    with pytest.raises(InvalidInput):
        pair[0].agent.add_peer(b"not metadata at all")


def test_unregistered_regions_fail(pair) -> None:
    init, target = pair
    stray = np.zeros(8192, dtype=np.uint8)
    lens = np.array([4096])
    outside = RegionList.build(MemoryKind.DRAM, [stray.ctypes.data], lens)
    with pytest.raises(TransferError, match="regist"):
        init.agent.read(outside, target.regions(np.array([0]), lens), target.agent.name)
    with pytest.raises(TransferError, match="regist"):
        init.agent.read(init.regions(np.array([0]), lens), outside, target.agent.name)
    past_end = target.regions(np.array([BUF_BYTES - 100]), lens)
    with pytest.raises(TransferError, match="regist"):
        init.agent.read(init.regions(np.array([0]), lens), past_end, target.agent.name)
    assert init.agent.num_live_transfers == 0


def test_unpaired_or_empty_lists_are_invalid(pair) -> None:
    init, target = pair
    name = target.agent.name
    with pytest.raises(InvalidInput, match="pair"):
        init.agent.read(
            init.regions(np.array([0, 64]), 64), target.regions(np.array([0]), 64), name
        )
    with pytest.raises(InvalidInput, match="length"):
        init.agent.read(init.regions(np.array([0]), 64), target.regions(np.array([0]), 32), name)
    empty = RegionList.build(MemoryKind.DRAM, [], [])
    with pytest.raises(InvalidInput, match="empty"):
        init.agent.write(empty, empty, name)
    with pytest.raises(InvalidInput, match="notify"):
        local, remote = init.regions(np.array([0]), 8), target.regions(np.array([0]), 8)
        init.agent.read(local, remote, name, notify="x")  # type: ignore[arg-type]


def test_wait_releases_on_success_and_spent_transfers_raise(pair) -> None:
    init, target = pair
    lens = np.array([64])
    transfer = init.agent.read(
        init.regions(np.array([0]), lens), target.regions(np.array([0]), lens), target.agent.name
    )
    assert init.agent.num_live_transfers == 1
    init.agent.wait(transfer, timeout_s=10)
    assert transfer.released and init.agent.num_live_transfers == 0
    with pytest.raises(InvalidTransition):
        init.agent.poll(transfer)
    with pytest.raises(InvalidTransition):
        init.agent.release(transfer)
    with pytest.raises(InvalidTransition):
        init.agent.wait(transfer, timeout_s=1)


def test_timeout_releases_the_handle(factory: Factory) -> None:
    init, target = factory.pair(stalled=True)
    lens = np.array([256 << 10])
    transfer = init.agent.read(
        init.regions(np.array([0]), lens), target.regions(np.array([0]), lens), target.agent.name
    )
    assert init.agent.poll(transfer) is TransferState.PENDING
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="not done after"):
        init.agent.wait(transfer, timeout_s=0.2)
    assert 0.2 <= time.monotonic() - start < 2.0
    assert transfer.released and init.agent.num_live_transfers == 0


def test_release_cancels_a_pending_transfer(factory: Factory) -> None:
    init, target = factory.pair(stalled=True)
    init.buf[:4096] = SENTINEL
    lens = np.array([4096])
    transfer = init.agent.read(
        init.regions(np.array([0]), lens), target.regions(np.array([0]), lens), target.agent.name
    )
    init.agent.release(transfer)
    assert transfer.released and init.agent.num_live_transfers == 0
    if factory.kind == "loopback":
        factory.registry.resume(target.agent.name)
        assert (init.buf[:4096] == SENTINEL).all()


def test_removed_peer_is_unavailable(factory: Factory) -> None:
    init, target = factory.pair()
    init.agent.remove_peer(target.agent.name)
    lens = np.array([64])
    with pytest.raises(PeerUnavailable):
        init.agent.read(
            init.regions(np.array([0]), lens),
            target.regions(np.array([0]), lens),
            target.agent.name,
        )
    assert init.agent.add_peer(target.agent.metadata()) == target.agent.name


def test_new_metadata_of_a_known_peer_replaces_it(factory: Factory) -> None:
    init, target = factory.pair()
    extra = np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8)
    factory.buffers.append(extra)
    target.agent.register([BufferInfo(extra.ctypes.data, extra.nbytes, MemoryKind.DRAM, 0, None)])
    assert init.agent.add_peer(target.agent.metadata()) == target.agent.name  # now covers extra
    remote = RegionList.build(MemoryKind.DRAM, [extra.ctypes.data], [4096])
    local = init.regions(np.array([0]), np.array([4096]))
    init.agent.wait(init.agent.read(local, remote, target.agent.name), timeout_s=10)
    assert np.array_equal(init.buf[:4096], extra)


def test_deregistered_memory_cannot_move(factory: Factory) -> None:
    side = factory.side("solo")
    extra = np.zeros(4096, dtype=np.uint8)
    registration = side.agent.register(
        [BufferInfo(extra.ctypes.data, extra.nbytes, MemoryKind.DRAM, 0, None)]
    )
    regions = RegionList.build(MemoryKind.DRAM, [extra.ctypes.data], [4096])
    side.agent.wait(side.agent.read(regions, side.regions(np.array([0]), 4096), side.agent.name), 5)
    side.agent.deregister(registration)
    with pytest.raises(TransferError, match="regist"):
        side.agent.read(regions, side.regions(np.array([0]), 4096), side.agent.name)
    with pytest.raises(InvalidTransition):
        side.agent.deregister(registration)


def test_close_releases_everything_and_is_idempotent(factory: Factory) -> None:
    init, target = factory.pair(stalled=True)
    lens = np.array([4096])
    transfer = init.agent.read(
        init.regions(np.array([0]), lens), target.regions(np.array([0]), lens), target.agent.name
    )
    init.agent.close()
    assert transfer.released and init.agent.num_live_transfers == 0
    init.agent.close()
    with pytest.raises(TransferError, match="closed"):
        init.agent.metadata()


# -- loopback-only fault injection --------------------------------------------------------------


def test_loopback_peer_closed_mid_transfer_fails_the_wait() -> None:
    factory = Factory("loopback")
    try:
        init, target = factory.pair(stalled=True)
        lens = np.array([64])
        transfer = init.agent.read(
            init.regions(np.array([0]), lens),
            target.regions(np.array([0]), lens),
            target.agent.name,
        )
        target.agent.close()
        factory.registry.resume(target.agent.name)
        with pytest.raises(PeerUnavailable, match="went away"):
            init.agent.wait(transfer, timeout_s=1)
        assert transfer.state is TransferState.FAILED and transfer.released
    finally:
        factory.close()


def test_loopback_resume_completes_a_stalled_transfer() -> None:
    factory = Factory("loopback")
    try:
        init, target = factory.pair(stalled=True)
        lens = np.array([4096])
        transfer = init.agent.read(
            init.regions(np.array([0]), lens),
            target.regions(np.array([0]), lens),
            target.agent.name,
        )
        assert init.agent.poll(transfer) is TransferState.PENDING
        factory.registry.resume(target.agent.name)
        init.agent.wait(transfer, timeout_s=1)
        assert np.array_equal(init.buf[:4096], target.buf[:4096])
    finally:
        factory.close()


# -- config --------------------------------------------------------------------------------------


def test_agent_config_defaults_are_the_measured_ones() -> None:
    config = AgentConfig()
    assert not config.progress_thread and not config.listen_thread
    assert config.backends == ("UCX", "POSIX")
    assert config.params("UCX") == {"ucx_error_handling_mode": "none"}
    assert config.params("POSIX") == {}
    custom = AgentConfig(backends=("UCX",), backend_params={"UCX": {"x": "1"}})
    assert custom.params("UCX") == {"x": "1"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backends": ()},
        {"backends": ("POSIX",)},  # default UCX params name a backend not listed
        {"poll_sleep_s": -1.0},
    ],
)
def test_agent_config_rejects(kwargs) -> None:
    with pytest.raises(ConfigError):
        AgentConfig(**kwargs)
