"""Helpers of the node cache tests: the test geometry, configs, a manual clock, peer process
argv and bounded waits on them, and the /dev/shm check."""

from __future__ import annotations

import json
import selectors
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node_peer import geometry

from fabric.kvbm import load_kvbm_config
from fabric.node import NodeCacheConfig
from fabric.node.config import segment_name

SPEC: dict[str, Any] = {"layers": 2, "kv_heads": 1, "head_size": 8, "block_size": 4}
NUM_BLOCKS = 8
WAIT_S = 180.0  # a bound, never a measurement: peers import torch on a shared 2-core host
PEER = Path(__file__).with_name("node_peer.py")
REPO = PEER.parents[2]


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node_config(
    namespace: str,
    *,
    num_blocks: int = NUM_BLOCKS,
    lease_s: float,
    endpoint: str = "tcp://127.0.0.1:0",
    **extra: Any,
) -> NodeCacheConfig:
    """``extra``: more ``NodeCacheConfig`` fields (the disk tier's)."""
    return NodeCacheConfig(
        kvbm=load_kvbm_config(block_size=SPEC["block_size"], cpu_cache_blocks=num_blocks),
        geometry=geometry(SPEC),
        namespace=namespace,
        node="test",
        lease_s=lease_s,
        endpoint=endpoint,
        **extra,
    )


def shm_exists(namespace: str) -> bool:
    return Path("/dev/shm", segment_name(namespace, "test")).exists()


def spec_for(endpoint: str, compat_hash: int, identity: str) -> dict[str, Any]:
    return {**SPEC, "endpoint": endpoint, "compat_hash": compat_hash, "identity": identity}


def peer_argv(spec: dict[str, Any], command: str, hashes: list[int]) -> list[str]:
    return [str(PEER), json.dumps(spec), command, ",".join(map(str, hashes))]


def read_json(proc: subprocess.Popen[str], timeout_s: float = WAIT_S) -> dict[str, Any]:
    """The next stdout line of ``proc`` that is a JSON object (bounded wait)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"process {proc.args!r} exited ({proc.wait()}) silently")
            if line.startswith("{"):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
    raise AssertionError(f"no JSON line from {proc.args!r} within {timeout_s} s")


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.05)
