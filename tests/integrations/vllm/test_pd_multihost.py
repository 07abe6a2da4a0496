"""vLLM prefill and decode instances on two hosts, the KV read over UCX on TCP.

The hosts are network namespaces of a ``fabric.bench.netns.Lab`` (``h-prefill``,
``h-decode``), each runner started under ``ip netns exec`` with UCX forced onto TCP over its
``eth0``; etcd runs in the root namespace on the lab's client address. The connectors bind
their signal servers to ``0.0.0.0`` and advertise what the route to etcd picks (the host's
``eth0`` address).

Over TCP a consumer's NIXL READ moves only while the producer polls its agent
(``fabric.pd.progress``): without that the reads time out and the consumer recomputes, and its
outputs are still right. So the test checks both: the consumer's tokens equal the single
engine's, and every block came over the network (blocks read, no read failure, no load error,
both holds released by the consumer, the producer polled its agent), and that vLLM kept
stepping while the producer held blocks.

Slow (three vLLM-CPU engines) and multihost (root, iproute2); skipped with the reason where
network namespaces cannot be made. Run with the .venv-vllm interpreter::

    .venv-vllm/bin/python -m pytest tests/integrations/vllm/test_pd_multihost.py -m slow -q
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest
from etcd_records import worker_records

from fabric.bench.netns import UCX_ENV, Lab, LabUnavailable, check_available, sweep_stale
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.registry import Role

pytestmark = [pytest.mark.slow, pytest.mark.multihost, pytest.mark.etcd, pytest.mark.nixl]

logger = logging.getLogger(__name__)

BLOCK = 32
MAX_TOKENS = 8
_rng = random.Random(16)
PROMPTS = [[_rng.randrange(2, 1024) for _ in range(n)] for n in (300, 77)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two hosts; closed (processes stopped, namespaces deleted) whatever the test did."""
    try:
        check_available()
    except LabUnavailable as exc:
        pytest.skip(f"no network namespaces: {exc}")
    swept = sweep_stale()
    if swept:
        logger.warning("removed namespaces of crashed runs: %s", ", ".join(swept))
    made = Lab(tmp_path_factory.mktemp("lab"), progress=logger.info)
    try:
        yield made.open(["h-prefill", "h-decode"])
    finally:
        made.close()
        left = made.leftovers()
        assert not left, f"namespaces left after close: {left}"


@pytest.fixture(scope="module")
def lab_etcd(lab: Lab) -> Iterator[str]:
    """etcd in the root namespace, on the address both hosts route to."""
    server = EtcdServer(host=lab.client_address).start()
    try:
        yield server.endpoint
    finally:
        server.close()


def _job(**fields: Any) -> dict[str, Any]:
    return {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "block_size": BLOCK, **fields}


@pytest.mark.parametrize(
    "producer_tiers", [{}, {"cpu_cache_blocks": 64}], ids=["held-in-vllm", "held-in-host-tier"]
)
def test_decode_on_another_host_reads_the_prefill_over_tcp(
    engines: Any,
    kv_transfer_config: Any,
    lab: Lab,
    lab_etcd: str,
    producer_tiers: dict[str, Any],
) -> None:
    """With a host tier the producer holds copies there and vLLM frees its requests at once;
    the scheduler side then keeps vLLM's engine stepping (``has_pending_push_work``)."""
    prefill_host, decode_host = lab.hosts["h-prefill"], lab.hosts["h-decode"]
    common = {
        "etcd_endpoints": lab_etcd,
        "signal_host": "0.0.0.0",
        "peer_timeout_s": 10.0,
        "read_timeout_s": 10.0,
        "hold_timeout_s": 120.0,
    }
    producer = engines.start(
        "mh-producer",
        _job(
            kv_transfer_config=kv_transfer_config(
                "kv_producer", worker_id="prefill-mh", **common, **producer_tiers
            ),
            kv_transfer_params=[{"do_remote_decode": True}] * len(PROMPTS),
            max_tokens=1,
            hold_wait_s=150,
        ),
        cpu=0,
        prefix=prefill_host.command([]),
        env=UCX_ENV,
    )
    reference = engines.start("mh-reference", _job(), cpu=1)  # the aggregated outputs
    expected = reference.result("outputs")["token_ids"]
    assert reference.wait() == 0, reference.tail()
    prefilled = producer.result("outputs")
    (record,) = [r for r in worker_records(lab_etcd) if r.worker_id.startswith("prefill-mh")]
    assert record.role is Role.PREFILL
    # Advertised at the prefill host's address (bound to 0.0.0.0), reachable from the other.
    assert f"//{prefill_host.address}:" in record.endpoints.to_json()["signal"]

    consumer = engines.start(
        "mh-consumer",
        _job(
            kv_transfer_config=kv_transfer_config("kv_consumer", worker_id="decode-mh", **common),
            kv_transfer_params=prefilled["kv_transfer_params"],
        ),
        cpu=1,
        prefix=decode_host.command([]),
        env=UCX_ENV,
    )
    decoded = consumer.result("outputs")
    assert consumer.wait() == 0, consumer.tail()
    released = producer.result("released", timeout_s=180)
    assert producer.wait() == 0, producer.tail()

    assert decoded["token_ids"] == expected
    stats = decoded["worker_stats"]
    blocks = sum(-(-len(p) // BLOCK) for p in PROMPTS)
    assert stats["num_peer_read_blocks"] == blocks, consumer.tail()
    assert stats["num_peer_read_failures"] == 0, consumer.tail()
    assert stats["num_load_errors"] == 0
    producer_stats = released["worker_stats"]
    assert producer_stats["num_holds_released"] == len(PROMPTS)  # by the consumer's TransferDone
    assert producer_stats["num_holds_expired"] == 0
    assert producer_stats["num_hold_polls"] > 0
    assert released["num_holds"] == 0
    host_holds = len(PROMPTS) if producer_tiers else 0
    assert prefilled["scheduler_stats"]["num_host_holds"] == host_holds
    # vLLM's own engine loop steps (``scheduler.has_requests()``) as long as blocks are held.
    assert released["num_idle_while_holding"] == 0
    assert released["scheduler_stats"]["tier_jobs_in_flight"] == 0  # host copies freed
