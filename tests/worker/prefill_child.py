"""A fake prefill worker process for the two-process handoff tests, and the fill both sides check.

Run as a script (``python tests/worker/prefill_child.py --etcd URL --namespace NS ...``), it builds
a ``KvBlockManager`` of the layout kind and geometry given in argv, a ``NixlAgent`` with the
device storage registered, a ``SignalServer`` on ``tcp://127.0.0.1:0`` and a
``WorkerRegistration`` (role PREFILL, endpoint "signal", agent name, compat hash) under a short
TTL. Its handler answers ``PrefillRequest`` with a fake prefill (every block filled from
``chunk_fill(sequence hash, layer, outer)``, registered, offered through ``PrefillHandoff``),
releases on ``TransferDone`` / ``Abort``, and prints one JSON line per release on stdout
(``{"event", "request_id", "released", "device_in_use", "held"}``) so the parent can check the
accounting. It expires stale handoffs every ``EXPIRE_EVERY_S`` and exits cleanly when its stdin
closes (or after ``--lifetime`` seconds), revoking its lease.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TextIO

import numpy as np
import torch

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Role
from fabric.kvbm import (
    KvBlockManager,
    KvGeometry,
    LayoutKind,
    SequenceHash,
    Storage,
    TensorStorage,
    build_kvbm,
    dtype_name,
    load_kvbm_config,
)
from fabric.signal.errors import ErrorCode
from fabric.signal.framing import PeerId
from fabric.signal.messages import (
    Abort,
    BlocksReady,
    ErrorReply,
    Message,
    PrefillRequest,
    TransferDone,
)
from fabric.signal.server import SignalServer
from fabric.transfer.nixl_agent import NixlAgent
from fabric.worker.handoff import PrefillHandoff

logger = logging.getLogger("prefill_child")

EXPIRE_EVERY_S = 0.2
VOCAB = 32000


# -- the deterministic fill both processes agree on ----------------------------------------------


def chunk_fill(sequence_hash: int, layer: int, outer: int, nbytes: int) -> np.ndarray:
    """The bytes of one (block, layer, outer) chunk of the block registered as ``sequence_hash``."""
    return np.random.default_rng([sequence_hash, layer, outer]).integers(
        0, 256, nbytes, dtype=np.uint8
    )


def _tensor_storage(storage: Storage) -> TensorStorage:
    assert isinstance(storage, TensorStorage), f"{type(storage).__name__} holds no tensors"
    return storage


def fill_blocks(
    storage: Storage, block_ids: Sequence[int], sequence_hashes: Sequence[SequenceHash]
) -> None:
    """Write ``chunk_fill`` into every chunk of ``block_ids`` (the fake prefill's compute)."""
    tensors = _tensor_storage(storage)
    spec = tensors.layout
    for block_id, h in zip(block_ids, sequence_hashes, strict=True):
        for layer in range(spec.num_layers):
            for outer in range(spec.outer_dim):
                view = tensors.block_view(block_id, layer, outer)
                data = torch.from_numpy(chunk_fill(h, layer, outer, spec.chunk_bytes))
                view.copy_(data.view(spec.dtype).view(view.shape))


def mismatched_blocks(
    storage: Storage, block_ids: Sequence[int], sequence_hashes: Sequence[SequenceHash]
) -> list[int]:
    """The positions whose block bytes differ from ``chunk_fill`` (empty when all match)."""
    tensors = _tensor_storage(storage)
    spec = tensors.layout

    def matches(block_id: int, h: int) -> bool:
        return all(
            np.array_equal(
                tensors.block_view(block_id, layer, outer).view(torch.uint8).numpy().reshape(-1),
                chunk_fill(h, layer, outer, spec.chunk_bytes),
            )
            for layer in range(spec.num_layers)
            for outer in range(spec.outer_dim)
        )

    pairs = enumerate(zip(block_ids, sequence_hashes, strict=True))
    return [i for i, (block_id, h) in pairs if not matches(block_id, h)]


def fake_first_token(sequence_hashes: Sequence[SequenceHash]) -> int:
    """The "sampled" first token of a prompt: derived from its last full block."""
    return sequence_hashes[-1] % VOCAB if sequence_hashes else 0


# -- the worker ----------------------------------------------------------------------------------


class FakePrefillWorker:
    """The signal handler: fake prefill, offer, release; reports releases on ``out``."""

    def __init__(self, kvbm: KvBlockManager, handoff: PrefillHandoff, out: TextIO) -> None:
        self._kvbm = kvbm
        self._handoff = handoff
        self._out = out
        self.lock = threading.Lock()  # the handler thread and the expiry loop share kvbm

    def handle(self, message: Message, peer: PeerId) -> Message | None:
        with self.lock:
            if isinstance(message, PrefillRequest):
                return self._prefill(message)
            if isinstance(message, TransferDone):
                released = self._handoff.complete(message)
                self._report("complete", message.request_id, released)
                if released:
                    return None
                return ErrorReply(
                    message.request_id,
                    ErrorCode.UNKNOWN_REQUEST,
                    "no blocks are held for this request (completed, aborted or expired)",
                )
            if isinstance(message, Abort):
                self._report("abort", message.request_id, self._handoff.abort(message.request_id))
                return None
        return ErrorReply(None, ErrorCode.UNKNOWN_TYPE, f"{type(message).__name__} not served")

    def expire(self) -> None:
        with self.lock:
            for request_id in self._handoff.expire(time.monotonic()):
                self._report("expired", request_id, True)

    def _prefill(self, request: PrefillRequest) -> BlocksReady | ErrorReply:
        hashes = self._kvbm.hash_tokens(request.token_ids).sequence_hashes
        blocks = self._kvbm.allocate(len(hashes))
        if blocks is None:
            return ErrorReply(request.request_id, ErrorCode.UNAVAILABLE, "prefill pool is full")
        fill_blocks(self._kvbm.storage(), blocks.block_ids, hashes)
        blocks.advance(blocks.capacity)
        registered = self._kvbm.register(blocks, hashes)
        try:
            return self._handoff.offer(
                request.request_id,
                registered,
                first_token=fake_first_token(hashes),
                num_tokens=len(request.token_ids),
            )
        finally:
            self._kvbm.release(registered)

    def _report(self, event: str, request_id: str, released: bool) -> None:
        line = {
            "event": event,
            "request_id": request_id,
            "released": released,
            "device_in_use": self._kvbm.pool().stats().num_in_use,
            "held": self._handoff.num_held,
        }
        self._out.write(json.dumps(line) + "\n")
        self._out.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--etcd", required=True, help="etcd client URL")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--kind", type=LayoutKind, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--kv-heads", type=int, required=True)
    parser.add_argument("--head-size", type=int, required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--device-blocks", type=int, default=64)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--hold-timeout", type=float, default=30.0)
    parser.add_argument("--lifetime", type=float, default=120.0)
    return parser.parse_args(argv)


def _stdin_closed(timeout_s: float) -> bool:
    ready, _, _ = select.select([sys.stdin.fileno()], [], [], timeout_s)
    return bool(ready) and not os.read(sys.stdin.fileno(), 1)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # NIXL logs to stdout; keep the JSON lines clean
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    torch.set_num_threads(1)
    geometry = KvGeometry(args.layers, args.kv_heads, args.head_size, dtype=torch.float16)
    config = load_kvbm_config(
        block_size=args.block_size, device_blocks=args.device_blocks, layout=args.kind
    )
    with ExitStack() as stack:
        kvbm = build_kvbm(config, geometry, device="cpu")
        stack.callback(kvbm.close)
        agent = NixlAgent(f"prefill-{args.worker_id}")
        stack.callback(agent.close)
        agent.register(kvbm.storage().buffers())
        handoff = PrefillHandoff(kvbm, agent, hold_timeout_s=args.hold_timeout)
        stack.callback(handoff.close)
        worker = FakePrefillWorker(kvbm, handoff, out)
        server = SignalServer(
            "tcp://127.0.0.1:0", worker.handle, compat_hash=kvbm.compat_hash, name=args.worker_id
        )
        stack.callback(server.close)
        registry = EtcdRegistry(args.etcd, timeout_s=1.0)
        stack.callback(registry.close)
        layout = kvbm.storage().layout
        record = WorkerRecord(
            worker_id=args.worker_id,
            role=Role.PREFILL,
            endpoints=Endpoints(signal=server.endpoint),
            agent_name=agent.name,
            layout=FabricLayout(
                block_size=layout.block_size,
                num_layers=layout.num_layers,
                outer_dim=layout.outer_dim,
                inner_dim=layout.inner_dim,
                dtype=dtype_name(layout.dtype),
                kind=layout.kind.value,
            ),
            compat_hash=kvbm.compat_hash,
            started_at=time.time(),
        )
        registration = WorkerRegistration(
            registry, record, ttl_s=args.ttl, namespace=args.namespace
        ).start()
        stack.callback(registration.close)
        deadline = time.monotonic() + args.lifetime
        while time.monotonic() < deadline and not _stdin_closed(EXPIRE_EVERY_S):
            worker.expire()
    return 0


if __name__ == "__main__":
    sys.exit(main())
