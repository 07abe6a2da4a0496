"""Two real processes, real NIXL over UCX on loopback: the decode side reads a prefill's blocks.

The "prefill" child is this file run as a script: it fills a KVBM host storage with bytes drawn
from a seed, registers it with a ``NixlAgent``, exports a ``RemoteBlockSet`` and sends it up a
pipe (length-prefixed frames; etcd discovery is wired later), then reports every NIXL
notification it receives as a frame until its stdin closes. The parent reads the blocks into a
storage of the other layout kind and checks every byte against a storage rebuilt from the seed.

Faults: the child is SIGKILLed before the read or in the middle of it; the parent must get a
``TransferError`` (``PeerUnavailable`` when NIXL sees the disconnect) within the deadline, with
no transfer handle left. A child killed and started again under the same agent name is read
from again (its new metadata replaces the old). Every child is killed in teardown and every
wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fabric.errors import TransferError
from fabric.kvbm import (
    LayoutKind,
    LayoutSpec,
    RemoteBlockSet,
    TensorStorage,
    export_block_set,
    host_storage,
    plan_read,
)
from fabric.pd import RemoteReader
from fabric.transfer.nixl_agent import NixlAgent

pytestmark = [
    pytest.mark.nixl,
]

COMPAT = 0xC0FFEE
STARTUP_S = 30.0
CHILD_LIFETIME_S = 120.0
FC, LS = LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE


def make_layout(spec: dict) -> LayoutSpec:
    return LayoutSpec(
        LayoutKind(spec["kind"]),
        spec["num_blocks"],
        spec["num_layers"],
        spec["outer_dim"],
        spec["block_size"],
        spec["inner_dim"],
        torch.float16,
        spec.get("alignment", 1),
    )


def seeded_storage(spec: LayoutSpec, seed: int) -> TensorStorage:
    storage = host_storage(spec)
    rng = np.random.default_rng(seed)
    for t in storage.tensors:
        raw = t.view(torch.uint8).numpy().reshape(-1)
        raw[:] = rng.integers(0, 256, raw.size, dtype=np.uint8)
    return storage


def block_bytes(storage: TensorStorage, block: int) -> bytes:
    spec = storage.layout
    return b"".join(
        storage.block_view(block, layer, outer).view(torch.uint8).numpy().tobytes()
        for layer in range(spec.num_layers)
        for outer in range(spec.outer_dim)
    )


def _send(out, payload: bytes) -> None:
    out.write(struct.pack("<I", len(payload)) + payload)
    out.flush()


def child_main() -> None:
    """The prefill process: export blocks, then report notifications until stdin closes.

    Its arguments come as one JSON line on stdin (block id lists outgrow argv).
    """
    args = json.loads(sys.stdin.buffer.readline())
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # NIXL logs to stdout; keep the frame pipe clean
    torch.set_num_threads(1)
    storage = seeded_storage(make_layout(args["layout"]), args["seed"])
    agent = NixlAgent(args["name"])
    agent.register(storage.buffers())
    _send(out, export_block_set(storage, args["ids"], agent, COMPAT).to_bytes())
    stdin = sys.stdin.fileno()
    deadline = time.monotonic() + CHILD_LIFETIME_S
    while time.monotonic() < deadline:
        for peer, message in agent.notifications():
            _send(out, f"{peer}:".encode() + message)
        ready, _, _ = select.select([stdin], [], [], 0.001)
        if ready and not os.read(stdin, 1):
            break
    agent.close()
    storage.close()


@dataclass
class Child:
    proc: subprocess.Popen

    def frame(self, timeout_s: float) -> bytes:
        (length,) = struct.unpack("<I", self._read(4, timeout_s))
        return self._read(length, timeout_s)

    def _read(self, n: int, timeout_s: float) -> bytes:
        fd, data = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout_s
        while len(data) < n:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"child sent nothing for {timeout_s} s")
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError(f"child exited with {self.proc.wait(5)}")
            data += chunk
        return data

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    children: list[Child] = []

    def start(
        layout: dict, ids: list[int], seed: int = 5, name: str | None = None
    ) -> tuple[Child, RemoteBlockSet]:
        args = {
            "layout": layout,
            "ids": ids,
            "seed": seed,
            "name": name or f"prefill-{uuid.uuid4().hex[:8]}",
        }
        log = open(tmp_path / f"child-{len(children)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=dict(os.environ, UCX_NET_DEVICES="lo"),
        )
        log.close()
        proc.stdin.write(json.dumps(args).encode() + b"\n")
        proc.stdin.flush()
        child = Child(proc)
        children.append(child)
        return child, RemoteBlockSet.from_bytes(child.frame(STARTUP_S))

    yield start
    for child in children:
        with contextlib.suppress(BrokenPipeError):
            child.proc.stdin.close()
        try:
            child.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
        child.proc.stdout.close()


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[NixlAgent]:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    decode = NixlAgent(f"decode-{uuid.uuid4().hex[:8]}")
    yield decode
    decode.close()


GEOMETRY = {"num_layers": 4, "outer_dim": 2, "block_size": 16, "inner_dim": 64}  # 16 KiB blocks


@pytest.mark.parametrize(
    ("remote_kind", "local_kind"), [(FC, LS), (LS, FC)], ids=["fc-ls", "ls-fc"]
)
def test_read_blocks_from_another_process(spawn, agent, remote_kind, local_kind) -> None:
    remote_layout = {"kind": remote_kind.value, "num_blocks": 64, **GEOMETRY}
    remote_ids = [*np.random.default_rng(1).permutation(64)[:24].tolist(), 40, 41, 42, 43]
    local_ids = [*range(50, 74), 2, 3, 4, 5]
    child, block_set = spawn(remote_layout, remote_ids)
    local_spec = make_layout(
        {"kind": local_kind.value, "num_blocks": 80, "alignment": 256, **GEOMETRY}
    )
    local = host_storage(local_spec)
    for t in local.tensors:
        t.view(torch.uint8).fill_(0xEE)
    agent.register(local.buffers())

    reader = RemoteReader(agent, local, compat_hash=COMPAT, timeout_s=10)
    reader.read(block_set, local_ids, notify=b"read-done")

    expected = seeded_storage(make_layout(remote_layout), seed=5)
    for src, dst in zip(remote_ids, local_ids, strict=True):
        assert block_bytes(local, dst) == block_bytes(expected, src), (src, dst)
    for block in set(range(80)) - set(local_ids):
        assert block_bytes(local, block) == b"\xee" * local_spec.block_bytes
    agent.send_notification(block_set.agent_name, b"verified")
    got = {child.frame(10), child.frame(10)}
    assert got == {f"{agent.name}:read-done".encode(), f"{agent.name}:verified".encode()}
    assert agent.num_live_transfers == 0


def test_a_peer_restarted_under_its_name_is_read_again(spawn, agent) -> None:
    layout = {"kind": "fully_contiguous", "num_blocks": 8, **GEOMETRY}
    ids = list(range(8))
    local = host_storage(make_layout({**layout, "kind": "layer_separate"}))
    agent.register(local.buffers())
    name = f"prefill-{uuid.uuid4().hex[:8]}"
    for seed in (5, 6):  # the second child is the first one restarted under the same name
        child, block_set = spawn(layout, ids, seed=seed, name=name)
        assert agent.add_peer(block_set.agent_metadata) == name  # replaces the dead one's
        assert agent.add_peer(block_set.agent_metadata) == name  # the same again: no-op
        # a reader of its own (no metadata cache of its own), as a second consumer would be
        RemoteReader(agent, local, compat_hash=COMPAT, timeout_s=10).read(block_set, ids)
        expected = seeded_storage(make_layout(layout), seed=seed)
        assert all(block_bytes(local, i) == block_bytes(expected, i) for i in ids), seed
        child.kill()
    assert agent.num_live_transfers == 0


def test_peer_killed_before_the_read(spawn, agent) -> None:
    remote_layout = {"kind": "fully_contiguous", "num_blocks": 16, **GEOMETRY}
    child, block_set = spawn(remote_layout, list(range(16)))
    local = host_storage(make_layout({**remote_layout, "kind": "layer_separate"}))
    agent.register(local.buffers())
    agent.add_peer(block_set.agent_metadata)  # known to the agent: the read itself fails
    reader = RemoteReader(agent, local, compat_hash=COMPAT, timeout_s=5)
    child.kill()
    start = time.monotonic()
    with pytest.raises(TransferError):
        reader.read(block_set, list(range(16)))
    assert time.monotonic() - start < 6
    assert agent.num_live_transfers == 0


def test_peer_killed_mid_transfer(spawn, agent) -> None:
    # 512-byte chunks, FC -> LS: 131072 descriptors of 512 B (about 0.6 s at 5 us each).
    geometry = {"num_layers": 4, "outer_dim": 1, "block_size": 4, "inner_dim": 64}
    remote_layout = {"kind": "fully_contiguous", "num_blocks": 32768, **geometry}
    ids = np.random.default_rng(2).permutation(32768).tolist()
    child, block_set = spawn(remote_layout, ids)
    local = host_storage(make_layout({**remote_layout, "kind": "layer_separate"}))
    agent.register(local.buffers())
    local_regions, remote_regions = plan_read(local, ids, block_set, compat_hash=COMPAT)
    assert len(local_regions) == 131072
    peer = agent.add_peer(block_set.agent_metadata)
    killer = threading.Timer(0.05, child.proc.send_signal, (signal.SIGKILL,))
    start = time.monotonic()
    killer.start()
    try:
        with pytest.raises(TransferError):
            agent.wait(agent.read(local_regions, remote_regions, peer), timeout_s=10)
    finally:
        killer.cancel()
    elapsed = time.monotonic() - start
    assert 0.05 <= elapsed < 11
    assert child.proc.wait(timeout=10) == -signal.SIGKILL
    assert agent.num_live_transfers == 0


if __name__ == "__main__":
    child_main()
