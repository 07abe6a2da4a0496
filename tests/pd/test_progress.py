"""HoldProgress: a producer's agent is polled while it holds blocks, and only then.

The NIXL test is the reason the mechanism exists: over UCX on TCP (forced on loopback with
``UCX_TLS=tcp``, as between hosts) a consumer's READ from a producer that never polls its agent
does not complete; with the producer's owner thread calling ``maybe_progress`` while a hold
exists it does, byte for byte. Each agent is touched by one thread only (the consumer's read
runs on a thread of its own, the producer's polls on the test's thread).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from fabric.errors import InvalidInput, TransferTimeout
from fabric.pd import HoldProgress, HoldTable
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.transfer.memory import BufferInfo, MemoryKind, RegionList
from fabric.transfer.nixl_agent import NixlAgent

NBYTES = 8 << 20
STALL_S = 1.0
"""How long an unpolled producer is given: a read over TCP never completes unpolled."""
READ_S = 60.0


class CountingAgent(LoopbackAgent):
    """A loopback agent that counts polls (``notifications``)."""

    num_polls = 0

    def notifications(self) -> list[tuple[str, bytes]]:
        self.num_polls += 1
        return super().notifications()


def _hold(holds: HoldTable[str], request_id: str) -> None:
    holds.hold(request_id, request_id, num_blocks=1, deadline=float("inf"))


def test_nothing_held_costs_no_poll() -> None:
    agent = CountingAgent("producer", LoopbackRegistry())
    holds: HoldTable[str] = HoldTable()
    progress = HoldProgress(agent, holds, interval_s=0.0)
    assert [progress.maybe_progress() for _ in range(100)] == [False] * 100
    assert agent.num_polls == progress.num_polls == 0


def test_polls_while_held_until_the_hold_leaves() -> None:
    agent = CountingAgent("producer", LoopbackRegistry())
    holds: HoldTable[str] = HoldTable()
    progress = HoldProgress(agent, holds, interval_s=0.0)
    _hold(holds, "r1")
    assert all(progress.maybe_progress() for _ in range(5))
    assert agent.num_polls == progress.num_polls == 5
    assert holds.finish("r1") == "r1"
    assert not progress.maybe_progress()
    assert agent.num_polls == 5


def test_paced_by_the_interval() -> None:
    """However often the owner calls, one poll per interval (an hour here: exactly one)."""
    agent = CountingAgent("producer", LoopbackRegistry())
    holds: HoldTable[str] = HoldTable()
    _hold(holds, "r1")
    progress = HoldProgress(agent, holds, interval_s=3600.0)
    assert [progress.maybe_progress() for _ in range(50)] == [True] + [False] * 49
    assert agent.num_polls == 1


def test_negative_interval_is_refused() -> None:
    agent = LoopbackAgent("producer", LoopbackRegistry())
    with pytest.raises(InvalidInput, match="interval_s"):
        HoldProgress(agent, HoldTable(), interval_s=-1.0)


# -- real NIXL over TCP ------------------------------------------------------------------------


def _buffer(array: np.ndarray) -> BufferInfo:
    return BufferInfo(array.ctypes.data, array.nbytes, MemoryKind.DRAM, 0, None)


def _region(array: np.ndarray) -> RegionList:
    return RegionList.build(MemoryKind.DRAM, [array.ctypes.data], [array.nbytes])


@pytest.fixture
def tcp_pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[NixlAgent, NixlAgent]]:
    """(producer, consumer) NixlAgents whose UCX may only use TCP on loopback."""
    monkeypatch.setenv("UCX_TLS", "tcp")
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    tag = uuid.uuid4().hex[:6]
    producer = NixlAgent(f"prefill-{tag}")
    try:
        consumer = NixlAgent(f"decode-{tag}")
    except BaseException:
        producer.close()
        raise
    try:
        yield producer, consumer
    finally:
        consumer.close()
        producer.close()


def _read_while_owner_polls(
    producer: NixlAgent, consumer: NixlAgent, progress: HoldProgress, timeout_s: float
) -> tuple[np.ndarray, np.ndarray, BaseException | None]:
    """The consumer reads the producer's buffer on a thread of its own while this thread (the
    producer's owner) calls ``maybe_progress``; returns (source, destination, error)."""
    src = np.random.default_rng(7).integers(0, 256, NBYTES, dtype=np.uint8)
    dst = np.zeros(NBYTES, dtype=np.uint8)
    producer.register([_buffer(src)])
    consumer.register([_buffer(dst)])
    peer = consumer.add_peer(producer.metadata())
    errors: list[BaseException] = []

    def read() -> None:
        try:
            consumer.wait(consumer.read(_region(dst), _region(src), peer), timeout_s)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    reader = threading.Thread(target=read, name="consumer-read")
    reader.start()
    while reader.is_alive():
        progress.maybe_progress()
        time.sleep(0.0005)  # the owner's loop: it polls, it does not wait for the read
    reader.join()
    return src, dst, errors[0] if errors else None


@pytest.mark.nixl
def test_tcp_read_stalls_without_a_hold_to_poll_for(tcp_pair: tuple[NixlAgent, NixlAgent]) -> None:
    """Nothing held: the owner's calls poll nothing, and the read over TCP never completes."""
    producer, consumer = tcp_pair
    progress = HoldProgress(producer, HoldTable(), interval_s=0.0)
    _, _, error = _read_while_owner_polls(producer, consumer, progress, STALL_S)
    assert isinstance(error, TransferTimeout), error
    assert progress.num_polls == 0


@pytest.mark.nixl
def test_tcp_read_completes_while_the_producer_holds_and_polls(
    tcp_pair: tuple[NixlAgent, NixlAgent],
) -> None:
    producer, consumer = tcp_pair
    holds: HoldTable[str] = HoldTable()
    _hold(holds, "r1")
    progress = HoldProgress(producer, holds)
    src, dst, error = _read_while_owner_polls(producer, consumer, progress, READ_S)
    assert error is None, error
    assert np.array_equal(dst, src)
    assert progress.num_polls > 0
