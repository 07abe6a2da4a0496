"""The prefill -> decode handoff across two processes: real etcd, real NIXL (UCX), ZMQ signals.

The prefill is ``prefill_child.py`` run with the venv's python; this process is the decode. It
finds the prefill only through a ``WorkerDirectory`` on etcd (nothing else tells it the signal
endpoint), asks for a prefill over the signal channel, reads the offered blocks with
``DecodeHandoff`` into a cache of the other layout kind, checks every byte against the fill
both sides derive from (sequence hash, layer, outer), sends ``TransferDone`` and reads the
child's accounting line: nothing may stay referenced in the prefill.

Faults: the child SIGKILLed between ``BlocksReady`` and the read (the read fails within its
deadline with no decode block left in use, and the child's record leaves the directory within
TTL + a bound); etcd restarted with a wiped data dir while the child lives (its record comes
back). Every process started here is stopped in a fixture's teardown and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from prefill_child import fake_first_token, mismatched_blocks

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.records import FabricLayout, WorkerRecord
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Role
from fabric.errors import DiscoveryError, PeerUnavailable
from fabric.kvbm import KvBlockManager, KvGeometry, LayoutKind, build_kvbm, load_kvbm_config
from fabric.signal.client import SignalClient
from fabric.signal.framing import wall_ms
from fabric.signal.messages import BlocksReady, PrefillRequest, TransferDone
from fabric.transfer.nixl_agent import NixlAgent
from fabric.worker.handoff import DecodeHandoff

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

CHILD_SCRIPT = Path(__file__).with_name("prefill_child.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
FC, LS = LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE
BLOCK_SIZE = 16
GEOMETRIES = {  # K/V split, fp16: layers * 2 * 16 tokens * kv_heads * head_size * 2 bytes
    "16KiB": KvGeometry(num_layers=4, num_kv_heads=2, head_size=32, dtype=torch.float16),
    "256KiB": KvGeometry(num_layers=8, num_kv_heads=4, head_size=128, dtype=torch.float16),
}
TTL_S = 1.0
STARTUP_S = 30.0  # the child imports torch and NIXL (about 3 s here) and registers
REPLY_S = 10.0
READ_TIMEOUT_S = 5.0
BOUND_S = 10.0
ETCD_CALL_S = 1.0


# -- the prefill child ----------------------------------------------------------------------------


@dataclass
class PrefillChild:
    """A running ``prefill_child.py``: its JSON lines arrive on ``lines``, its stderr in a log."""

    proc: subprocess.Popen[str]
    log_path: Path
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next_line(self, timeout_s: float) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(
                f"the prefill child printed nothing within {timeout_s} s; log:\n{self.log_tail()}"
            ) from None

    def log_tail(self, num_lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Close stdin (the child exits cleanly, revoking its lease); kill it if it lingers."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


# -- the decode side (this process) and the harness ---------------------------------------------


@dataclass
class DecodeSide:
    kvbm: KvBlockManager
    agent: NixlAgent
    handoff: DecodeHandoff

    @property
    def num_in_use(self) -> int:
        return self.kvbm.pool().stats().num_in_use


class Harness:
    """What one test starts on one etcd and namespace; ``close`` stops all of it, newest first."""

    def __init__(self, etcd: EtcdServer, namespace: str, log_dir: Path) -> None:
        self.etcd = etcd
        self.namespace = namespace
        self._log_dir = log_dir
        self._started = contextlib.ExitStack()

    def spawn_prefill(self, kind: LayoutKind, geometry: KvGeometry) -> PrefillChild:
        worker_id = f"prefill-{uuid.uuid4().hex[:8]}"
        log_path = self._log_dir / f"{worker_id}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(CHILD_SCRIPT),
                    f"--etcd={self.etcd.endpoint}",
                    f"--namespace={self.namespace}",
                    f"--worker-id={worker_id}",
                    f"--kind={kind.value}",
                    f"--layers={geometry.num_layers}",
                    f"--kv-heads={geometry.num_kv_heads}",
                    f"--head-size={geometry.head_size}",
                    f"--block-size={BLOCK_SIZE}",
                    f"--ttl={TTL_S}",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO_ROOT,
                env=dict(os.environ, UCX_NET_DEVICES="lo"),
            )
        child = PrefillChild(proc, log_path)
        self._started.callback(child.stop)
        return child

    def decode(self, kind: LayoutKind, geometry: KvGeometry) -> DecodeSide:
        config = load_kvbm_config(block_size=BLOCK_SIZE, device_blocks=64, layout=kind)
        kvbm = build_kvbm(config, geometry, device="cpu")
        self._started.callback(kvbm.close)
        agent = NixlAgent(f"decode-{uuid.uuid4().hex[:8]}")
        self._started.callback(agent.close)
        agent.register(kvbm.storage().buffers())
        return DecodeSide(kvbm, agent, DecodeHandoff(kvbm, agent, timeout_s=READ_TIMEOUT_S))

    def directory(self) -> tuple[EtcdRegistry, WorkerDirectory]:
        """A registry client and a directory of the namespace's prefill workers."""
        registry = EtcdRegistry(self.etcd.endpoint, timeout_s=ETCD_CALL_S)
        self._started.callback(registry.close)
        directory = WorkerDirectory(registry, role=Role.PREFILL, namespace=self.namespace)
        self._started.callback(directory.close)
        return registry, directory.start()

    def client(self, record: WorkerRecord, compat_hash: int) -> SignalClient:
        """A signal client to ``record``'s signal endpoint (the only place it is read from)."""
        assert record.endpoints.signal is not None
        client = SignalClient(
            record.endpoints.signal,
            identity=f"decode-{uuid.uuid4().hex[:8]}",
            compat_hash=compat_hash,
            timeout_s=REPLY_S,
        )
        self._started.callback(client.close)
        return client

    def close(self) -> None:
        self._started.close()


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(name="fabric-handoff-etcd") as server:
        yield server


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    """An etcd for one test, which may restart or wipe it."""
    with EtcdServer(name="fabric-handoff-etcd-private") as server:
        yield server


def _harness(
    etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Harness]:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")  # for this process's NIXL agent
    harness = Harness(etcd, f"handoff-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def fabric(etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from _harness(etcd, tmp_path, monkeypatch)


@pytest.fixture
def private_fabric(
    private_etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Harness]:
    yield from _harness(private_etcd, tmp_path, monkeypatch)


def the_prefill(directory: WorkerDirectory, child: PrefillChild) -> WorkerRecord:
    """The one prefill worker of the namespace, as the directory found it."""
    if not directory.wait_for(lambda workers: len(workers) == 1, STARTUP_S):
        raise AssertionError(f"no prefill worker registered; child log:\n{child.log_tail()}")
    (record,) = directory.workers().values()
    return record


def request_prefill(client: SignalClient, request_id: str, tokens: list[int]) -> BlocksReady:
    request = PrefillRequest(request_id, tokens, 1, client.identity, {}, wall_ms() + 30_000)
    ready = client.request(request)
    assert isinstance(ready, BlocksReady), ready
    return ready


def hand_off(
    decode: DecodeSide,
    client: SignalClient,
    child: PrefillChild,
    request_id: str,
    tokens: list[int],
) -> None:
    """One whole handoff: request, read, verify every byte, TransferDone, prefill accounting."""
    hashes = decode.kvbm.hash_tokens(tokens).sequence_hashes
    ready = request_prefill(client, request_id, tokens)
    assert (ready.first_token, ready.num_tokens) == (fake_first_token(hashes), len(tokens))
    with decode.handoff.receive(ready, hashes) as blocks:
        assert blocks.sequence_hashes == hashes
        assert mismatched_blocks(decode.kvbm.storage(), blocks.block_ids, hashes) == []
        client.send(TransferDone(request_id, len(blocks)))
    assert decode.agent.num_live_transfers == 0
    line = child.next_line(REPLY_S)
    assert line == {
        "event": "complete",
        "request_id": request_id,
        "released": True,
        "device_in_use": 0,
        "held": 0,
    }


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``predicate`` until it holds; False once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def prompt(num_blocks: int, start: int = 0) -> list[int]:
    return list(range(start, start + num_blocks * BLOCK_SIZE + 5))  # and a partial block


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry_name", list(GEOMETRIES))
@pytest.mark.parametrize(
    ("prefill_kind", "decode_kind"), [(FC, LS), (LS, FC)], ids=["fc-ls", "ls-fc"]
)
def test_handoff_across_processes(
    fabric: Harness, geometry_name: str, prefill_kind: LayoutKind, decode_kind: LayoutKind
) -> None:
    geometry = GEOMETRIES[geometry_name]
    child = fabric.spawn_prefill(prefill_kind, geometry)
    decode = fabric.decode(decode_kind, geometry)
    _, directory = fabric.directory()
    record = the_prefill(directory, child)
    assert record.compat_hash == decode.kvbm.compat_hash
    assert isinstance(record.layout, FabricLayout)
    assert record.layout.kind == prefill_kind.value
    client = fabric.client(record, decode.kvbm.compat_hash)

    hand_off(decode, client, child, "req-1", prompt(12))
    registered = decode.kvbm.pool().stats().registered

    # A longer prompt sharing the first: only its 6 new blocks cross the wire.
    hand_off(decode, client, child, "req-2", prompt(18))
    assert decode.kvbm.pool().stats().registered - registered == 6
    assert decode.num_in_use == 0


@pytest.mark.parametrize("peer", ["first-contact", "known-peer"])
def test_prefill_killed_before_the_read(fabric: Harness, peer: str) -> None:
    geometry = GEOMETRIES["16KiB"]
    child = fabric.spawn_prefill(FC, geometry)
    decode = fabric.decode(LS, geometry)
    registry, directory = fabric.directory()
    record = the_prefill(directory, child)
    client = fabric.client(record, decode.kvbm.compat_hash)
    if peer == "known-peer":  # the decode has loaded the prefill's metadata and read from it
        hand_off(decode, client, child, "earlier", prompt(2, start=10_000))
    tokens = prompt(8)
    ready = request_prefill(client, "doomed", tokens)

    child.kill()
    killed_at = time.monotonic()
    # known peer: NIXL sees the disconnect when the read is posted; new peer: loading its
    # metadata cannot connect. Either way the caller learns the peer is gone.
    with pytest.raises(PeerUnavailable):
        decode.handoff.receive(ready, decode.kvbm.hash_tokens(tokens).sequence_hashes)

    assert time.monotonic() - killed_at < READ_TIMEOUT_S + 1.0
    assert decode.num_in_use == 0
    assert decode.agent.num_live_transfers == 0
    # Nobody revoked the lease: only its expiry takes the record out of the directory.
    assert directory.wait_for(lambda workers: record.worker_id not in workers, TTL_S + BOUND_S)
    assert time.monotonic() - killed_at <= TTL_S + 2.5
    assert registry.get(record.key(fabric.namespace)) is None


def test_record_comes_back_after_etcd_is_wiped(private_fabric: Harness) -> None:
    geometry = GEOMETRIES["16KiB"]
    child = private_fabric.spawn_prefill(LS, geometry)
    decode = private_fabric.decode(FC, geometry)
    registry, directory = private_fabric.directory()
    record = the_prefill(directory, child)
    key = record.key(private_fabric.namespace)

    private_fabric.etcd.restart(wipe=True)
    restarted_at = time.monotonic()

    def stored() -> bytes | None:
        with contextlib.suppress(DiscoveryError):
            return registry.get(key)
        return None

    back = wait_until(lambda: stored() == record.to_bytes(), BOUND_S)
    assert back, f"the record did not come back; child log:\n{child.log_tail()}"
    assert time.monotonic() - restarted_at < 5.0
    assert directory.wait_for(lambda workers: workers.get(record.worker_id) == record, BOUND_S)
    assert wait_until(lambda: directory.connected, BOUND_S)
    # A directory opened now finds the worker too, and it still serves handoffs.
    _, fresh = private_fabric.directory()
    client = private_fabric.client(the_prefill(fresh, child), decode.kvbm.compat_hash)
    hand_off(decode, client, child, "after-wipe", prompt(4))
