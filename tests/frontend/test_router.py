"""Prefix-aware routing end to end: real KV event batches from ``ZmqEventPublisher``s, real HTTP.

Prefill workers here are records plus publishers (the frontend never talks to them: it names one
in ``GenerateRequest.prefill_worker``); the decode worker is a ``FakeWorker``. One test runs the
directory on a real etcd.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from frontend_fakes import BLOCK_SIZE, COMPAT, FakeWorker, RunningFrontend, register, wait_until

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Registry, Role
from fabric.frontend.generation import FrontendSettings
from fabric.frontend.tokenizer import TextCodec
from fabric.kvbm.event_publisher import ZmqEventPublisher
from fabric.kvbm.events import AllCleared, BlockRemoved, BlockStored
from fabric.kvbm.hashing import sequence_hashes
from fabric.kvbm.types import SequenceHash, Tier

MakeWorker = Callable[..., FakeWorker]
StartFrontend = Callable[..., RunningFrontend]
PROMPT = list(range(200, 200 + 4 * BLOCK_SIZE))  # 4 full blocks
HASHES = sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT)


def stored(hashes: list[SequenceHash], tier: Tier = Tier.DEVICE) -> BlockStored:
    return BlockStored(tier, tuple(hashes), None, None, None, BLOCK_SIZE)


class PrefillWorkers:
    """Prefill records whose KV events come from real publishers (with replay)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.publishers: dict[str, ZmqEventPublisher] = {}
        self._registrations: list[WorkerRegistration] = []

    def add(self, worker_id: str, *, compat_hash: int = COMPAT) -> ZmqEventPublisher:
        publisher = ZmqEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
        self.publishers[worker_id] = publisher
        endpoints = {"events": publisher.endpoint}
        endpoints["events_replay"] = publisher.replay_endpoint or ""
        self._registrations.append(
            register(self._registry, worker_id, Role.PREFILL, endpoints, compat_hash=compat_hash)
        )
        return publisher

    def close(self) -> None:
        for registration in self._registrations:
            registration.close()
        for publisher in self.publishers.values():
            publisher.close()


@pytest.fixture
def prefills(registry: Registry) -> Iterator[PrefillWorkers]:
    workers = PrefillWorkers(registry)
    yield workers
    workers.close()


def complete(running: RunningFrontend, worker: FakeWorker) -> tuple[str, int]:
    """Send PROMPT; return the prefill worker the decode worker was told and the blocks hit."""
    result = openai.OpenAI(
        base_url=f"{running.url}/v1", api_key="unused", max_retries=0
    ).completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    request = worker.next_request()
    fabric = (result.model_extra or {})["fabric"]
    assert fabric["prefill_worker"] == request.prefill_worker
    return request.prefill_worker, fabric["routed_prefix_blocks"]


def test_prefill_chosen_by_longest_cached_prefix(
    prefills: PrefillWorkers, make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    decode = make_worker("decode-a")
    p1 = prefills.add("prefill-1")
    p2 = prefills.add("prefill-2")
    prefills.add("prefill-x", compat_hash=COMPAT + 1)  # other KV: never paired with decode-a
    p1.publish([stored(HASHES[:2])])  # before the frontend exists: it learns them by replay
    p2.publish([stored(HASHES[:1]), stored(HASHES[1:3])])
    running = start_frontend()
    index = running.frontend.router.index
    assert wait_until(lambda: index.num_blocks("prefill-1") == 2)
    assert wait_until(lambda: index.num_blocks("prefill-2") == 3)
    assert complete(running, decode) == ("prefill-2", 3)

    p2.publish([BlockRemoved(Tier.DEVICE, tuple(HASHES[1:3]))])
    assert wait_until(lambda: index.num_blocks("prefill-2") == 1)
    assert complete(running, decode) == ("prefill-1", 2)

    p2.publish([stored(HASHES[1:], Tier.HOST)])  # offloaded copies count too
    p1.publish([AllCleared(Tier.DEVICE)])
    assert wait_until(lambda: index.num_blocks("prefill-1") == 0)
    assert wait_until(lambda: index.num_blocks("prefill-2") == 4)
    assert complete(running, decode) == ("prefill-2", 4)
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'fabric_frontend_prefix_blocks_total{result="hit"} 9.0' in metrics
    assert 'fabric_frontend_prefix_blocks_total{result="miss"} 3.0' in metrics


def test_prefill_ties_broken_by_load_and_aggregated_gets_none(
    prefills: PrefillWorkers, make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    decode = make_worker("decode-a")
    decode.silent = True  # the first request holds prefill-1 until it times out
    prefills.add("prefill-1")
    prefills.add("prefill-2")
    running = start_frontend(FrontendSettings(idle_timeout_s=1.5))
    assert wait_until(lambda: running.frontend.router.count_by_role()[Role.PREFILL] == 2)
    url = f"{running.url}/v1/completions"
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    threads = [threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body})]
    threads.append(threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body}))
    threads[0].start()
    first = decode.next_request()
    threads[1].start()
    second = decode.next_request()
    for thread in threads:
        thread.join(10.0)
    assert (first.prefill_worker, second.prefill_worker) == ("prefill-1", "prefill-2")
    decode.close()
    aggregated = make_worker("agg-a", role=Role.AGGREGATED)
    assert wait_until(lambda: running.frontend.router.count_by_role()[Role.DECODE] == 0)
    openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused").completions.create(
        model="tiny", prompt=PROMPT, max_tokens=2
    )
    assert aggregated.next_request().prefill_worker == ""


@pytest.mark.etcd
def test_directory_on_real_etcd(start_frontend: StartFrontend, codec: TextCodec) -> None:
    with EtcdServer(name="fabric-frontend-test-etcd") as server:
        etcd = EtcdRegistry(server.endpoint, timeout_s=2.0)
        try:
            running = start_frontend(on_registry=etcd)
            worker = FakeWorker(etcd, "decode-etcd", codec)
            try:
                assert wait_until(lambda: httpx.get(f"{running.url}/health").status_code == 200)
                result = openai.OpenAI(
                    base_url=f"{running.url}/v1", api_key="unused", max_retries=0
                ).completions.create(model="tiny", prompt="Hello", max_tokens=3)
                assert result.choices[0].finish_reason == "length"
            finally:
                worker.close()
            assert wait_until(lambda: httpx.get(f"{running.url}/health").status_code == 503)
            running.server.stop()
            running.frontend.router.close()
        finally:
            etcd.close()
