"""The node cache across processes, with real shared memory: ``python -m fabric.node`` serving
a writer process and this one; writers and readers SIGKILLed mid-protocol. Every wait is bounded
and polls a state; no timing decides a verdict."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from node_harness import (
    SPEC,
    WAIT_S,
    peer_argv,
    read_json,
    shm_exists,
    spec_for,
    wait_until,
)
from node_peer import attach, exact, filled_storage, layout

from fabric.kvbm import SequenceHash, host_storage
from fabric.node import NodeCacheClient, NodeCacheService

Start = Callable[[list[str]], subprocess.Popen[str]]


def test_a_writer_process_stores_and_this_one_loads_byte_exact_then_stop_unlinks(
    namespace: str, peers: Start
) -> None:
    service = peers(
        [
            "-m",
            "fabric.node",
            "--blocks",
            "8",
            "--block-size",
            str(SPEC["block_size"]),
            "--model",
            "tiny",
            "--namespace",
            namespace,
            "--node",
            "test",
            "--lease-s",
            "5",
        ]
    )
    ready = read_json(service)
    assert ready["num_blocks"] == 8 and shm_exists(namespace)
    # The tiny preset: 4 layers, 2 KV heads of 64, float32.
    spec = {
        **spec_for(ready["endpoint"], ready["compat_hash"], "writer"),
        "layers": 4,
        "kv_heads": 2,
        "head_size": 64,
        "dtype": "float32",
    }
    hashes = [21, 22, 23, 24, 25]
    writer = peers(peer_argv(spec, "store", hashes))
    assert read_json(writer) == {"stored": 5, "held": 0}
    assert writer.wait(WAIT_S) == 0
    with attach({**spec, "identity": "reader"}) as reader:
        dst = host_storage(layout(spec, 6), pin=False)
        seq = [SequenceHash(h) for h in [*hashes, 26]]
        assert reader.load(seq, dst, list(range(6))) == 5
        assert exact(dst, hashes, 5)
    service.send_signal(signal.SIGTERM)
    assert service.wait(WAIT_S) == 0
    assert not shm_exists(namespace)


def _spec(service: NodeCacheService, identity: str) -> dict[str, object]:
    return spec_for(service.endpoint, service.cache.geometry.compat_hash, identity)


def test_a_writer_killed_between_reserve_and_commit_exposes_nothing_and_its_slots_return(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    peers: Start,
) -> None:
    service = make_service(lease_s=1.0)
    hashes = [31, 32, 33, 34, 35, 36, 37, 38]  # the whole pool
    writer = peers(peer_argv(_spec(service, "doomed"), "reserve-and-hang", hashes))
    assert len(read_json(writer)["slots"]) == 8  # reserved, half-written
    writer.send_signal(signal.SIGKILL)
    writer.wait(WAIT_S)
    client = make_client(service)
    seq = [SequenceHash(h) for h in hashes]
    assert client.lookup(seq).lease_id is None  # never matchable, before or after the lease
    wait_until(lambda: client.stats()["reserved_slots"] == 0, "the reservation's reclaim")
    stats = client.stats()
    assert stats["expired_reservations"] == 1
    assert stats["quarantined_slots"] + stats["num_free"] == 8  # quarantined, then free
    wait_until(lambda: client.stats()["num_free"] == 8, "the quarantine's end")
    assert client.lookup(seq).lease_id is None
    result = client.store(seq, filled_storage(SPEC, hashes), list(range(8)))
    assert result.num_stored == 8  # every slot came back
    dst = host_storage(layout(SPEC, 8), pin=False)
    assert client.load(seq, dst, list(range(8))) == 8 and exact(dst, hashes, 8)
    service.cache.check_invariants()


def test_a_reader_killed_while_pinning_leaks_no_pin(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    peers: Start,
) -> None:
    service = make_service(lease_s=1.0)
    client = make_client(service)
    hashes = [41, 42, 43, 44, 45, 46, 47, 48]
    seq = [SequenceHash(h) for h in hashes]
    assert client.store(seq, filled_storage(SPEC, hashes), list(range(8))).num_stored == 8
    reader = peers(peer_argv(_spec(service, "doomed"), "pin-and-hang", hashes[:4]))
    assert len(read_json(reader)["pinned"]) == 4
    reader.send_signal(signal.SIGKILL)
    reader.wait(WAIT_S)
    wait_until(lambda: client.stats()["pinned_blocks"] == 0, "the pin's reclaim")
    assert client.stats()["expired_pins"] == 1
    fresh = list(range(1001, 1009))  # a full pool of new blocks: everything old is evicted
    stored = client.store(
        [SequenceHash(h) for h in fresh], filled_storage(SPEC, fresh), list(range(8))
    )
    assert stored.num_stored == 8
    assert client.lookup(seq[:1]).lease_id is None
    service.cache.check_invariants()


def test_a_node_cache_killed_by_sigkill_is_replaced_by_the_next_and_a_live_one_is_not(
    namespace: str, peers: Start
) -> None:
    argv = ["-m", "fabric.node", "--blocks", "8", "--block-size", str(SPEC["block_size"])]
    argv += ["--model", "tiny", "--namespace", namespace, "--node", "test"]
    # Its own process group, killed whole as an OOM kill or a container's SIGKILL does: with
    # it dies the resource tracker that would otherwise unlink the segment.
    first = subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        read_json(first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(WAIT_S)
        assert first.stdout is not None
        first.stdout.close()
    assert shm_exists(namespace), "the killed group left no segment: nothing to replace"
    second = peers(argv)
    ready = read_json(second)
    assert ready["num_blocks"] == 8 and shm_exists(namespace)
    spec = {**spec_for(ready["endpoint"], ready["compat_hash"], "writer"), "layers": 4}
    spec |= {"kv_heads": 2, "head_size": 64, "dtype": "float32"}  # the tiny preset
    writer = peers(peer_argv(spec, "store", [31, 32]))
    assert read_json(writer) == {"stored": 2, "held": 0}  # the new segment serves
    refused = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=WAIT_S, check=False
    )
    assert refused.returncode != 0 and "another node cache serves segment" in refused.stderr
    assert shm_exists(namespace)  # the refused one left the live one's segment alone
    second.send_signal(signal.SIGTERM)
    assert second.wait(WAIT_S) == 0
    assert not shm_exists(namespace)
    assert not list(Path("/dev/shm").glob(f"*{namespace}*"))  # nor the owner lock file
