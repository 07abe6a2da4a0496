"""The node cache's disk tier (``fabric.node.disk``): a full shared pool's blocks still hit from
disk, a corrupt file is a miss (the prefix cut there), and a node cache killed with SIGKILL and
restarted with the same ``--disk-dir`` serves a worker's link that attaches again, byte-exact.
Every wait is bounded and polls a state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from node_harness import NUM_BLOCKS, SPEC, WAIT_S, read_json, wait_until
from node_peer import exact, filled_storage, layout

from fabric.kvbm import SequenceHash, host_storage
from fabric.node import NodeCacheClient, NodeCacheService, attach_node_cache
from fabric.node.link import NodeLink, fixed_endpoint
from fabric.supervise import free_port

DISK_BLOCKS = 4 * NUM_BLOCKS


def hashes(*values: int) -> list[SequenceHash]:
    return [SequenceHash(v) for v in values]


def store(client: NodeCacheClient, hs: list[SequenceHash]) -> int:
    return client.store(hs, filled_storage(SPEC, list(hs)), list(range(len(hs)))).num_stored


def load(client: NodeCacheClient, hs: list[SequenceHash]) -> tuple[int, bool]:
    dst = host_storage(layout(SPEC, len(hs)), pin=False)
    n = client.load(hs, dst, list(range(len(hs))))
    return n, exact(dst, list(hs), n)


def written(service: NodeCacheService, client: NodeCacheClient) -> dict[str, int]:
    """The stats once every queued disk write ended and its references were given back."""
    assert service.disk is not None and service.disk.wait_idle(WAIT_S)
    return client.stats()  # a request: the written batches' references are released first


def test_a_full_pool_spills_to_disk_and_its_blocks_still_hit(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    tmp_path: Path,
) -> None:
    service = make_service(disk_dir=tmp_path, disk_blocks=DISK_BLOCKS)
    writer, reader = make_client(service, "w"), make_client(service, "r")
    first, second = hashes(*range(1, NUM_BLOCKS + 1)), hashes(*range(101, NUM_BLOCKS + 101))
    assert store(writer, first) == NUM_BLOCKS
    assert written(service, writer)["disk_written"] == NUM_BLOCKS
    assert store(writer, second) == NUM_BLOCKS  # the pool is full: every first block evicted
    stats = written(service, writer)
    assert (stats["disk_written"], stats["disk_blocks"], stats["evictions"]) == (16, 16, 8)
    assert load(reader, first) == (NUM_BLOCKS, True)  # from disk, through the pool
    stats = reader.stats()
    assert (stats["disk_onboarded"], stats["disk_written"]) == (NUM_BLOCKS, 16)
    assert load(reader, first) == (NUM_BLOCKS, True)  # now in the pool: no disk read
    assert reader.stats()["disk_onboarded"] == NUM_BLOCKS
    service.cache.check_invariants()


def test_a_corrupt_disk_file_is_a_miss_and_the_prefix_stops_there(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    tmp_path: Path,
) -> None:
    first = make_service(disk_dir=tmp_path, disk_blocks=DISK_BLOCKS)
    client = make_client(first)
    stored = hashes(1, 2, 3, 4)
    assert store(client, stored) == 4
    assert written(first, client)["disk_written"] == 4
    assert first.disk is not None
    path = first.disk.store.block_path(stored[2])
    first.close()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one payload bit: the checksum no longer matches
    path.write_bytes(bytes(raw))
    second = make_service(disk_dir=tmp_path, disk_blocks=DISK_BLOCKS)  # starts empty in memory
    reader = make_client(second, "r")
    assert load(reader, stored) == (2, True)
    assert reader.stats()["disk_onboarded"] == 2
    assert not path.exists()  # removed as corrupt, never served


def test_a_killed_node_cache_restarted_on_its_disk_dir_serves_a_reattached_link(
    namespace: str, tmp_path: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "fabric.node", "--blocks", str(NUM_BLOCKS), "--block-size"]
    argv += [str(SPEC["block_size"]), "--model", "tiny", "--namespace", namespace]
    argv += ["--node", "test", "--endpoint", endpoint, "--disk-dir", str(tmp_path)]
    argv += ["--disk-blocks", str(DISK_BLOCKS)]
    spec = {**SPEC, "layers": 4, "kv_heads": 2, "head_size": 64, "dtype": "float32"}  # tiny
    stored = hashes(11, 12, 13, 14, 15)
    procs: list[subprocess.Popen[str]] = []

    def start() -> dict[str, object]:
        # its own process group, killed whole (its resource tracker with it), as an OOM kill
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        )
        return read_json(procs[-1])

    link: NodeLink | None = None
    try:
        ready = start()
        assert ready["disk_blocks"] == DISK_BLOCKS
        compat = int(str(ready["compat_hash"]))
        link = NodeLink(
            fixed_endpoint(endpoint),
            identity="worker",
            compat_hash=compat,
            layout=layout(spec, 1),
            retry_s=0.0,
        )
        assert link.store(stored, filled_storage(spec, list(stored)), list(range(5))) == 5
        with attach_node_cache(
            endpoint, identity="probe", compat_hash=compat, layout=layout(spec, 1)
        ) as probe:
            wait_until(lambda: probe.stats()["disk_written"] == 5, "the write-through")
        os.killpg(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait(WAIT_S)
        start()  # same disk dir, a new (empty) segment
        dst = host_storage(layout(spec, 5), pin=False)
        wait_until(  # the first use is refused (a new instance): the link attaches again
            lambda: link is not None and link.load(stored, dst, lambda n: list(range(n))) == 5,
            "a load from the restarted node cache",
        )
        assert exact(dst, list(stored), 5)
        assert link.num_attaches == 2
    finally:
        if link is not None:
            link.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(WAIT_S)
            assert proc.stdout is not None
            proc.stdout.close()
