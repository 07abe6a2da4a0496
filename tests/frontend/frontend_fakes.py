"""A fake decode / aggregated worker for the frontend tests, and shared helpers.

Imported by bare name (pytest puts this directory on ``sys.path``); the name is unique across the
test tree.

``FakeWorker`` is a real ``SignalServer`` registered (lease + record) in a real registry: it
answers each ``GenerateRequest`` from its own thread with one ``TokenChunk`` per token of
``ANSWER`` plus EOS (finish "stop"), or the first ``max_tokens`` of them (finish "length"), and
records every request and ``Abort``. Knobs: ``fail_with`` (an error chunk), ``silent`` (never
answers), ``token_delay_s`` (before each chunk), ``gate`` (cleared: requests wait for it before
their first chunk), ``refuse_with`` (``ErrorReply`` ``UNAVAILABLE``: a draining worker's
refusal), ``drain()`` (its record marked ``draining``). ``max_active`` is the most requests it
ever held at once (from receipt to just before its final chunk is sent, so a frontend never sees
a request end before it is uncounted). With ``events=True`` it also owns a real
``ZmqEventPublisher`` (with replay) and registers its ``events`` endpoints, so a test can publish
the KV events a real decode or aggregated worker would.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Registry, Role
from fabric.errors import FabricError
from fabric.frontend.generation import Frontend
from fabric.frontend.server import BackgroundServer
from fabric.frontend.tokenizer import TextCodec
from fabric.kvbm import BlockStored, SequenceHash, Tier, ZmqEventPublisher
from fabric.signal.errors import ErrorCode
from fabric.signal.framing import PeerId
from fabric.signal.messages import Abort, ErrorReply, GenerateRequest, Message, TokenChunk
from fabric.signal.server import SignalServer

COMPAT = 0xFAB0C0DE
BLOCK_SIZE = 16
MODEL = "tiny"
ANSWER = " the fabric moves blocks"
EOS = 1
WAIT_S = 10.0
STATS: dict[str, float | int | str | bool] = {
    "cached_tokens": 16,
    "computed_tokens": 4,
    "kv_transfer_ms": 1.5,
    "prefill_ms": 3.0,
    "ttft_ms": 5.0,
}


def stored(hashes: list[SequenceHash], tier: Tier = Tier.DEVICE) -> BlockStored:
    """A KV event: ``hashes`` (one chain, no parent) stored in ``tier``, blocks of BLOCK_SIZE."""
    return BlockStored(tier, tuple(hashes), None, None, None, BLOCK_SIZE)


def worker_record(
    worker_id: str,
    role: Role = Role.AGGREGATED,
    *,
    node: str | None = None,
    compat: int = COMPAT,
    block_size: int | None = BLOCK_SIZE,
    attached: bool = True,
) -> WorkerRecord:
    """A record as a worker (or a node cache) publishes it, with no endpoints; a worker naming a
    node is attached to its node's cache unless ``attached`` is False."""
    return WorkerRecord(
        worker_id,
        role,
        Endpoints(),
        None,
        FabricLayout(block_size=block_size),
        compat,
        0.0,
        node=node,
        node_cache=attached and node is not None and role is not Role.NODE_CACHE,
    )


def wait_until(predicate: Callable[[], object], timeout_s: float = WAIT_S) -> bool:
    """Poll ``predicate`` until it is truthy; False once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def register(
    registry: Registry,
    worker_id: str,
    role: Role,
    endpoints: Endpoints,
    *,
    compat_hash: int = COMPAT,
    model: str = MODEL,
    node: str | None = None,
) -> WorkerRegistration:
    record = WorkerRecord(
        worker_id=worker_id,
        role=role,
        endpoints=endpoints,
        agent_name=None,
        layout=FabricLayout(model=model, block_size=BLOCK_SIZE),
        compat_hash=compat_hash,
        started_at=time.time(),
        node=node,
        node_cache=node is not None and role is not Role.NODE_CACHE,
    )
    return WorkerRegistration(registry, record, ttl_s=5.0).start()


@dataclass
class RunningFrontend:
    frontend: Frontend
    server: BackgroundServer

    @property
    def url(self) -> str:
        return self.server.url


class FakeWorker:
    """See the module docstring."""

    def __init__(
        self,
        registry: Registry,
        worker_id: str,
        codec: TextCodec,
        *,
        role: Role = Role.DECODE,
        model: str = MODEL,
        events: bool = False,
        node: str | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.answer_ids = [*codec.encode(ANSWER), EOS]
        self.requests: queue.Queue[GenerateRequest] = queue.Queue()
        self.aborts: queue.Queue[Abort] = queue.Queue()
        self.fail_with: str | None = None
        self.refuse_with: str | None = None  # answer GenerateRequests UNAVAILABLE (draining)
        self.silent = False
        self.token_delay_s = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.max_active = 0
        self._active: set[str] = set()
        self._active_lock = threading.Lock()
        self._aborted: set[str] = set()
        self._server = SignalServer(
            "tcp://127.0.0.1:0", self._handle, compat_hash=COMPAT, name=worker_id
        )
        endpoints = Endpoints(signal=self._server.endpoint)
        self.publisher: ZmqEventPublisher | None = None
        if events:
            self.publisher = ZmqEventPublisher(
                "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0"
            )
            endpoints = Endpoints(
                signal=self._server.endpoint,
                events=self.publisher.endpoint,
                events_replay=self.publisher.replay_endpoint,
            )
        self._registration = register(registry, worker_id, role, endpoints, model=model, node=node)

    def drain(self) -> None:
        """Mark the record draining, as a worker does on its first SIGTERM."""
        self._registration.drain()

    def close(self) -> None:
        """Leave the registry (the record disappears at once) and stop serving; idempotent."""
        self._registration.close()
        self._server.close()
        if self.publisher is not None:
            self.publisher.close()

    def next_request(self) -> GenerateRequest:
        return self.requests.get(timeout=WAIT_S)

    def next_abort(self) -> Abort:
        return self.aborts.get(timeout=WAIT_S)

    def _handle(self, message: Message, peer: PeerId) -> Message | None:
        if isinstance(message, GenerateRequest):
            self.requests.put(message)
            if self.refuse_with is not None:
                return ErrorReply(message.request_id, ErrorCode.UNAVAILABLE, self.refuse_with)
            threading.Thread(target=self._generate, args=(message, peer), daemon=True).start()
        elif isinstance(message, Abort):
            self._aborted.add(message.request_id)
            self.aborts.put(message)
        return None

    def _generate(self, request: GenerateRequest, peer: PeerId) -> None:
        with self._active_lock:
            self._active.add(request.request_id)
            self.max_active = max(self.max_active, len(self._active))
        try:
            self._answer(request, peer)
        finally:
            self._leave(request.request_id)

    def _leave(self, request_id: str) -> None:
        with self._active_lock:
            self._active.discard(request_id)

    def _answer(self, request: GenerateRequest, peer: PeerId) -> None:
        rid = request.request_id
        if self.silent:
            return
        self.gate.wait(WAIT_S)
        if self.fail_with is not None:
            stats: dict[str, float | int | str | bool] = {"error": self.fail_with}
            self._leave(rid)
            with contextlib.suppress(FabricError):
                self._server.send(peer, TokenChunk(rid, [], True, "error", stats))
            return
        tokens = self.answer_ids[: request.max_tokens]
        reason = "stop" if len(tokens) == len(self.answer_ids) else "length"
        for i, token in enumerate(tokens):
            time.sleep(self.token_delay_s)
            if rid in self._aborted:
                return
            last = i == len(tokens) - 1
            chunk = TokenChunk(rid, [token], last, reason if last else "", STATS if last else {})
            if last:
                self._leave(rid)
            try:
                self._server.send(peer, chunk)
            except FabricError:  # the frontend went away: nobody to stream to
                return
