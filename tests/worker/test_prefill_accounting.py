"""The prefill side's accounting of held handoffs: every path that ends a hold updates the
``fabric_worker_held_handoffs`` gauge and frees the blocks (issue 15, "stale accounting")."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric.engine import Engine
from fabric.errors import PeerUnavailable
from fabric.kvbm import KvBlockManager, build_kvbm, load_kvbm_config
from fabric.models.config import ModelConfig
from fabric.signal.framing import PeerId
from fabric.signal.messages import Message, PrefillRequest
from fabric.transfer import LoopbackAgent, LoopbackRegistry
from fabric.worker.handoff import PrefillHandoff
from fabric.worker.metrics import WorkerMetrics
from fabric.worker.prefill_service import PrefillService

GONE = PeerId("decode-gone")


class DeadDecode:
    """An ``Outbox`` whose decode worker is gone: every push fails, as the signal server's does."""

    def __init__(self) -> None:
        self.num_pushes = 0

    def send(self, peer: str, message: Message) -> None:
        self.num_pushes += 1
        raise PeerUnavailable(f"decode worker {peer} is not connected")

    def send_all(self, peer: str, messages: Sequence[Message]) -> None:
        for message in messages:
            self.send(peer, message)


@dataclass
class Prefill:
    kvbm: KvBlockManager
    handoff: PrefillHandoff
    service: PrefillService
    outbox: DeadDecode

    def held_gauge(self) -> float | None:
        return self.kvbm.metrics.registry.get_sample_value("fabric_worker_held_handoffs")


@pytest.fixture
def prefill(tiny_dir: Path) -> Iterator[Prefill]:
    config = load_kvbm_config(block_size=16, device_blocks=16)
    kvbm = build_kvbm(config, ModelConfig.from_dir(tiny_dir).kv_geometry())
    agent = LoopbackAgent("prefill", LoopbackRegistry())
    try:
        agent.register(kvbm.storage().buffers())
        handoff = PrefillHandoff(kvbm, agent, hold_timeout_s=600)
        metrics = WorkerMetrics(kvbm.metrics.registry, role="prefill", worker_id="p", model="m")
        outbox = DeadDecode()
        service = PrefillService(Engine(tiny_dir, kvbm), handoff, outbox, metrics, max_waiting=4)
        yield Prefill(kvbm, handoff, service, outbox)
        service.close()
    finally:
        agent.close()
        kvbm.close()


def test_a_handoff_aborted_because_the_decode_is_gone_is_not_counted(prefill: Prefill) -> None:
    request = PrefillRequest("r-1", list(range(1, 41)), 4, GONE, {}, 0)
    prefill.service.submit(request, GONE, time.monotonic())
    assert prefill.service.step()  # computed, offered, the push failed, the handoff aborted
    assert prefill.outbox.num_pushes >= 1
    assert prefill.handoff.num_held == 0
    assert prefill.kvbm.pool().stats().num_in_use == 0  # the blocks were freed...
    assert prefill.held_gauge() == 0  # ...and the gauge says so
