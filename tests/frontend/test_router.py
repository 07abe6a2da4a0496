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
from frontend_fakes import (
    BLOCK_SIZE,
    COMPAT,
    FakeWorker,
    RunningFrontend,
    register,
    stored,
    wait_until,
)

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.records import Endpoints
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Registry, Role
from fabric.frontend.generation import FrontendSettings
from fabric.frontend.tokenizer import TextCodec
from fabric.kvbm import (
    AllCleared,
    BlockRemoved,
    Tier,
    ZmqEventPublisher,
    sequence_hashes,
)

MakeWorker = Callable[..., FakeWorker]
StartFrontend = Callable[..., RunningFrontend]
PROMPT = list(range(200, 200 + 4 * BLOCK_SIZE))  # 4 full blocks
HASHES = sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT)


class PrefillWorkers:
    """Prefill records whose KV events come from real publishers (with replay)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.publishers: dict[str, ZmqEventPublisher] = {}
        self._registrations: list[WorkerRegistration] = []

    def add(self, worker_id: str, *, compat_hash: int = COMPAT) -> ZmqEventPublisher:
        publisher = ZmqEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
        self.publishers[worker_id] = publisher
        endpoints = Endpoints(events=publisher.endpoint, events_replay=publisher.replay_endpoint)
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
    index = running.frontend.router.fleet.index
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
    assert wait_until(lambda: running.frontend.router.fleet.count_by_role()[Role.PREFILL] == 2)
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
    assert wait_until(lambda: running.frontend.router.fleet.count_by_role()[Role.DECODE] == 0)
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
            running.frontend.close()
        finally:
            etcd.close()


# Every worker's events; peer hits; the routing pin
# ---------------------------------------------------------------------------------------------


def post(
    running: RunningFrontend, body: dict[str, object], path: str = "completions"
) -> httpx.Response:
    return httpx.post(f"{running.url}/v1/{path}", json={"model": "tiny", **body}, timeout=10.0)


def route_of(response: httpx.Response) -> tuple[str, str, str]:
    """(serving worker, KV source, route kind) as the response's ``fabric`` field says."""
    assert response.status_code == 200, response.text
    fabric = response.json()["fabric"]
    assert fabric["decode_worker"] == fabric["worker"]
    assert fabric["routed_prefill_worker"] == fabric["prefill_worker"]
    return fabric["worker"], fabric["prefill_worker"], fabric["route"]


def test_the_index_follows_decode_and_aggregated_workers(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    decode = make_worker("decode-a", events=True)
    aggregated = make_worker("agg-b", role=Role.AGGREGATED, events=True)
    assert decode.publisher is not None and aggregated.publisher is not None
    decode.publisher.publish([stored(HASHES[:2])])  # before the frontend: learnt by replay
    running = start_frontend()
    index = running.frontend.router.fleet.index
    assert wait_until(lambda: index.num_blocks("decode-a") == 2)
    aggregated.publisher.publish([stored(HASHES[:3], Tier.HOST)])
    assert wait_until(lambda: index.num_blocks("agg-b") == 3)
    aggregated.publisher.publish([BlockRemoved(Tier.HOST, (HASHES[2],))])
    assert wait_until(lambda: index.num_blocks("agg-b") == 2)
    # decode-a serves (the smallest id) and computes locally: there is no prefill worker.
    response = post(running, {"prompt": PROMPT, "max_tokens": 2, "fabric": {"worker": "decode-a"}})
    assert route_of(response) == ("decode-a", "", "local")
    assert response.json()["fabric"]["routed_local_blocks"] == 2
    aggregated.close()  # leaving forgets its blocks
    assert wait_until(lambda: index.num_blocks("agg-b") == 0)
    assert running.frontend.router.fleet.subscriber("agg-b") is None
    assert index.num_blocks("decode-a") == 2


def test_peer_hit_reads_the_prefix_another_aggregated_worker_holds(
    make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    first = make_worker("agg-1", role=Role.AGGREGATED, events=True)
    holder = make_worker("agg-2", role=Role.AGGREGATED, events=True)
    assert holder.publisher is not None and first.publisher is not None
    holder.publisher.publish([stored(HASHES[:3])])
    running = start_frontend()
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.index.num_blocks("agg-2") == 3)
    # Both idle: the holder serves (the longer cached prefix breaks the load tie), locally.
    response = post(running, {"prompt": PROMPT, "max_tokens": 2})
    assert route_of(response) == ("agg-2", "", "local")
    assert response.json()["fabric"]["routed_local_blocks"] == 3
    assert holder.next_request().prefill_worker == ""
    # The holder busy: agg-1 serves and reads the holder's 3 blocks instead of computing them.
    holder.token_delay_s = 0.3
    busy = threading.Thread(
        target=post,
        args=(running, {"prompt": "x", "max_tokens": 50, "fabric": {"worker": "agg-2"}}),
    )
    busy.start()
    try:
        assert wait_until(lambda: fleet.in_flight()["agg-2"][1] == 1)
        response = post(running, {"prompt": PROMPT, "max_tokens": 2})
        assert route_of(response) == ("agg-1", "agg-2", "peer_hit")
        fabric = response.json()["fabric"]
        assert (fabric["routed_prefix_blocks"], fabric["routed_local_blocks"]) == (3, 0)
        assert first.next_request().prefill_worker == "agg-2"
    finally:
        busy.join(10.0)
    # Once agg-1 holds the prefix too there is nothing to gain: a pinned request computes.
    first.publisher.publish([stored(HASHES[:3])])
    assert wait_until(lambda: fleet.index.num_blocks("agg-1") == 3)
    response = post(running, {"prompt": PROMPT, "max_tokens": 2, "fabric": {"worker": "agg-1"}})
    assert route_of(response) == ("agg-1", "", "local")
    assert response.json()["fabric"]["route_pinned"] is True
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'fabric_frontend_routes_total{kind="local"} 3.0' in metrics
    assert 'fabric_frontend_routes_total{kind="peer_hit"} 1.0' in metrics
    assert 'fabric_frontend_routes_total{kind="prefill"} 0.0' in metrics


def test_the_pin_routes_to_the_named_workers(
    prefills: PrefillWorkers, make_worker: MakeWorker, start_frontend: StartFrontend
) -> None:
    decode_a = make_worker("decode-a")
    decode_b = make_worker("decode-b")
    prefills.add("prefill-1")
    prefills.add("prefill-2").publish([stored(HASHES[:2])])
    running = start_frontend()
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.index.num_blocks("prefill-2") == 2)
    assert wait_until(lambda: fleet.count_by_role()[Role.DECODE] == 2)
    base = {"prompt": PROMPT, "max_tokens": 2}
    # Pinned serving worker, automatic KV source (prefill-2 holds the prefix).
    response = post(running, {**base, "fabric": {"worker": "decode-b"}})
    assert route_of(response) == ("decode-b", "prefill-2", "prefill")
    assert decode_b.next_request().prefill_worker == "prefill-2"
    # A forced KV source, with the official client's extra_body; then forced local compute.
    result = openai.OpenAI(
        base_url=f"{running.url}/v1", api_key="unused", max_retries=0
    ).completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=2,
        extra_body={"fabric": {"prefill_worker": "prefill-1"}},
    )
    fabric = (result.model_extra or {})["fabric"]
    assert (fabric["worker"], fabric["prefill_worker"], fabric["route"]) == (
        "decode-a",
        "prefill-1",
        "prefill",
    )
    assert fabric["route_pinned"] is True and fabric["routed_prefix_blocks"] == 0
    assert decode_a.next_request().prefill_worker == "prefill-1"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = post(running, {**chat, "fabric": {"prefill_worker": ""}}, "chat/completions")
    assert route_of(response) == ("decode-a", "", "local")
    assert decode_a.next_request().prefill_worker == ""


@pytest.mark.parametrize(
    "case",
    [
        ({"worker": "nope"}, "fabric.worker", ["'nope'", "decode-a, decode-b"]),
        ({"worker": "prefill-1"}, "fabric.worker", ["prefill worker", "decode-a, decode-b"]),
        ({"worker": ""}, "fabric.worker", []),
        ({"prefill_worker": "nope"}, "fabric.prefill_worker", ["agg-c, prefill-1, prefill-x"]),
        ({"prefill_worker": "decode-a"}, "fabric.prefill_worker", ["decode worker", "prefill-1"]),
        (
            {"worker": "decode-a", "prefill_worker": "prefill-x"},
            "fabric.prefill_worker",
            ["cannot exchange KV", "compat hash"],
        ),
        ({"prefill_worker": "prefill-x"}, "fabric.prefill_worker", ["can read its KV"]),
        ({"worker": "agg-c", "prefill_worker": "agg-c"}, "fabric.prefill_worker", ["itself"]),
        ({"worker": "decode-a", "bogus": 1}, "fabric.bogus", []),
    ],
)
def test_a_pin_naming_no_suitable_worker_is_a_400(
    prefills: PrefillWorkers,
    make_worker: MakeWorker,
    start_frontend: StartFrontend,
    case: tuple[dict[str, object], str, list[str]],
) -> None:
    pin, param, words = case
    worker = make_worker("decode-a")
    make_worker("decode-b")
    make_worker("agg-c", role=Role.AGGREGATED)
    prefills.add("prefill-1")
    prefills.add("prefill-x", compat_hash=COMPAT + 1)
    running = start_frontend()
    assert wait_until(lambda: len(running.frontend.router.fleet.workers()) == 5)
    response = post(running, {"prompt": PROMPT, "max_tokens": 2, "fabric": pin})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    for word in words:
        assert word in error["message"]
    assert worker.requests.empty()
    metrics = httpx.get(f"{running.url}/metrics").text
    assert (
        'fabric_frontend_request_errors_total{endpoint="completions",status="400"} 1.0' in metrics
    )
