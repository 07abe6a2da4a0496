"""A decode worker that leaves the fleet loses its prefill handoffs at once, not at the hold
timeout (``python -m fabric.bench chaos``, fault ``kill_decode``: a killed decode's handoffs
stayed pinned for 30 s after its record left etcd).

Driven by directory events on an ``InMemoryRegistry`` (delivery is synchronous there), never by
sleeping for the timeout: the holds here last 600 s, so a release within a test is the LEFT's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness_probes import wait_until

from fabric.config import load_config
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Lease, Role
from fabric.engine import Engine
from fabric.kvbm import KvBlockManager, build_kvbm, load_kvbm_config
from fabric.models.config import ModelConfig
from fabric.signal.client import SignalClient
from fabric.signal.framing import PeerId
from fabric.signal.messages import BlocksReady, Message, PrefillRequest
from fabric.transfer import LoopbackAgent, LoopbackRegistry
from fabric.worker.handoff import PrefillHandoff
from fabric.worker.metrics import WorkerMetrics
from fabric.worker.prefill_service import PrefillService
from fabric.worker.runtime import build_worker

NAMESPACE = "departure"
HOLD_S = 600.0  # far beyond any bound here: only a LEFT can release a hold in these tests
BOUND_S = 5.0
D, E = PeerId("decode-d"), PeerId("decode-e")


class Outbox:
    """An ``Outbox`` whose decode workers are reachable: it records what was pushed."""

    def __init__(self) -> None:
        self.pushed: list[tuple[str, Message]] = []

    def send(self, peer: str, message: Message) -> None:
        self.pushed.append((peer, message))

    def send_all(self, peer: str, messages: Sequence[Message]) -> None:
        for message in messages:
            self.send(peer, message)


@dataclass
class Fleet:
    """A prefill service wired to a worker directory as the runtime wires it."""

    registry: InMemoryRegistry
    kvbm: KvBlockManager
    handoff: PrefillHandoff
    service: PrefillService
    outbox: Outbox

    def join(self, worker_id: str) -> Lease:
        lease = self.registry.grant_lease(60)
        record = decode_record(worker_id)
        self.registry.put(record.key(NAMESPACE), record.to_bytes(), lease=lease)
        return lease

    def ask(self, peer: PeerId, request_id: str, seed: int) -> None:
        """``peer`` asks for a 40-token prompt (3 blocks); distinct seeds share no prefix."""
        prompt = [2 + (seed * 41 + i) % 1000 for i in range(40)]
        self.service.submit(PrefillRequest(request_id, prompt, 4, peer, {}, 0), peer, 0.0)

    def served(self, request_id: str) -> bool:
        return any(
            isinstance(m, BlocksReady) and m.request_id == request_id for _, m in self.outbox.pushed
        )

    def in_use(self) -> int:
        return self.kvbm.pool().stats().num_in_use

    def held_gauge(self) -> float | None:
        return self.kvbm.metrics.registry.get_sample_value("fabric_worker_held_handoffs")


def decode_record(worker_id: str) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role=Role.DECODE,
        endpoints=Endpoints(signal="tcp://127.0.0.1:5555"),
        agent_name=f"loopback-{worker_id}",
        layout=FabricLayout(block_size=16, dtype="float32"),
        compat_hash=0xC0FFEE,
        started_at=time.time(),
    )


@pytest.fixture
def fleet(tiny_dir: Path) -> Iterator[Fleet]:
    registry = InMemoryRegistry()
    config = load_kvbm_config(block_size=16, device_blocks=16)
    kvbm = build_kvbm(config, ModelConfig.from_dir(tiny_dir).kv_geometry())
    agent = LoopbackAgent("prefill", LoopbackRegistry())
    try:
        agent.register(kvbm.storage().buffers())
        handoff = PrefillHandoff(kvbm, agent, hold_timeout_s=HOLD_S)
        metrics = WorkerMetrics(kvbm.metrics.registry, role="prefill", worker_id="p", model="m")
        outbox = Outbox()
        service = PrefillService(Engine(tiny_dir, kvbm), handoff, outbox, metrics, max_waiting=8)
        directory = WorkerDirectory(
            registry, namespace=NAMESPACE, on_change=service.on_worker_change
        ).start()
        yield Fleet(registry, kvbm, handoff, service, outbox)
        directory.close()
        service.close()
    finally:
        agent.close()
        kvbm.close()
        registry.close()


def test_a_decode_that_left_loses_its_handoffs_at_once_and_others_keep_theirs(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    lease_d = fleet.join(D)
    fleet.join(E)
    for request_id, peer, seed in (("d-1", D, 1), ("d-2", D, 2), ("e-1", E, 3)):
        fleet.ask(peer, request_id, seed)
        assert fleet.service.step()
    assert fleet.handoff.num_held == 3 and fleet.held_gauge() == 3
    assert fleet.in_use() == 9

    with caplog.at_level(logging.INFO, logger="fabric.worker.prefill_service"):
        fleet.registry.revoke(lease_d)  # D's record is gone: a LEFT, delivered synchronously
        assert fleet.handoff.num_held == 3  # the watch thread only queued it...
        fleet.service.step()  # ...the service's own thread applies it

    assert fleet.handoff.num_held == 1 and fleet.held_gauge() == 1
    assert fleet.in_use() == 3  # D's 6 blocks are free; E's 3 stay held for its read
    assert fleet.handoff.abort("e-1") and not fleet.handoff.abort("d-1")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        "decode worker decode-d left: released 2 handoffs (6 blocks) held for it, dropped 0 "
        "queued prefills"
    ]


def test_prefills_a_departed_decode_queued_are_dropped_uncomputed(fleet: Fleet) -> None:
    lease_d = fleet.join(D)
    fleet.join(E)
    fleet.ask(D, "d-1", 1)
    fleet.ask(E, "e-1", 2)
    fleet.registry.revoke(lease_d)
    assert fleet.service.step()  # D's request dropped; E's computed
    assert not fleet.service.step()
    assert not fleet.served("d-1") and fleet.served("e-1")
    assert fleet.handoff.num_held == 1


def test_a_decode_back_under_the_same_id_keeps_what_it_asks_after(fleet: Fleet) -> None:
    lease_d = fleet.join(D)
    fleet.ask(D, "old", 1)
    assert fleet.service.step()
    fleet.registry.revoke(lease_d)  # D was killed: its record left...
    fleet.join(D)  # ...and D restarted under the same id, before the service stepped
    fleet.ask(D, "new-queued", 2)  # asked after the LEFT was seen, not yet computed
    assert fleet.service.step()  # applies the LEFT, then computes "new-queued"
    assert fleet.served("new-queued")
    fleet.ask(D, "new-held", 3)
    assert fleet.service.step()

    assert fleet.handoff.num_held == 2 and fleet.held_gauge() == 2
    assert not fleet.handoff.abort("old")  # released by the LEFT
    assert fleet.handoff.abort("new-queued") and fleet.handoff.abort("new-held")


def test_a_prefill_worker_releases_what_it_held_for_a_decode_whose_record_left(
    tiny_dir: Path,
) -> None:
    """The runtime wiring: the worker's own directory and scheduler thread, real signal sockets."""
    registry = InMemoryRegistry()
    loopback = LoopbackRegistry()
    config = load_config(
        model=str(tiny_dir),
        worker_id="prefill",
        namespace=NAMESPACE,
        device_blocks=32,
        hold_timeout_s=HOLD_S,
    )
    runtime = build_worker(
        Role.PREFILL, config, registry=registry, make_agent=lambda n: LoopbackAgent(n, loopback)
    )
    signal = runtime.record.endpoints.signal
    assert signal is not None
    clients = {
        peer: SignalClient(signal, identity=peer, compat_hash=runtime.record.compat_hash)
        for peer in (D, E)
    }
    try:
        leases = {}
        for peer in (D, E):
            leases[peer] = registry.grant_lease(60)
            record = decode_record(peer)
            registry.put(record.key(NAMESPACE), record.to_bytes(), lease=leases[peer])
        for n, (peer, client) in enumerate(clients.items()):
            prompt = [2 + (n * 41 + i) % 1000 for i in range(40)]
            client.send(PrefillRequest(f"{peer}-1", prompt, 4, peer, {}, 0))

        def held() -> float | None:
            return runtime.kvbm.metrics.registry.get_sample_value("fabric_worker_held_handoffs")

        assert wait_until(lambda: held() == 2, BOUND_S), held()
        registry.revoke(leases[D])
        assert wait_until(lambda: held() == 1, BOUND_S), held()
        assert runtime.kvbm.pool().stats().num_in_use == 3  # E's 3 blocks only
    finally:
        for client in clients.values():
            client.close()
        runtime.close()
        registry.close()
