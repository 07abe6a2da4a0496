"""The producer (prefill) instance's side of a P/D transfer: holds, signals, discovery.

After a prefill finishes, vLLM keeps its blocks (``request_finished`` returned delay-free) until
the worker reports the request in ``finished_sending``. This module decides when:

* ``HoldTable`` (thread-safe): one entry per held request::

      hold() ──▶ HELD ──PrefillRequest (same prompt)──▶ LENT ──TransferDone / Abort──▶ DONE
                   │                                     │
                   └────────── deadline passed ──────────┴──▶ EXPIRED

  A lent hold's deadline is pushed out by the consumer's read bound, so blocks are never freed
  under a read that is still allowed to run. ``collect`` (engine thread) returns the DONE and
  EXPIRED requests, which the worker then reports as sent; later requests for them are refused.
* ``ProducerEndpoint``: a ``SignalServer`` on an ephemeral port answering ``PrefillRequest`` with
  ``BlocksReady`` (the held blocks as a ``RemoteBlockSet``: NIXL agent metadata, buffers, ids)
  and taking ``TransferDone`` / ``Abort``. Its endpoint goes into the instance's etcd record
  (``discovery.instance_record``, registered by the worker).

Threads: the signal handler runs on the server thread and only touches the hold table and
immutable data (the block set template is built once, with the agent metadata read at start),
never the NIXL agent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from fabric.integrations.vllm.metadata import PeerHold, token_digest
from fabric.integrations.vllm.pages import PageGeometry
from fabric.integrations.vllm.stats import WorkerStats
from fabric.kvbm import RemoteBlockSet, Storage
from fabric.kvbm.remote import REMOTE_BLOCK_SET_VERSION, RemoteBuffer
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
from fabric.transfer.agent import TransferAgent

logger = logging.getLogger(__name__)

_MAX_FORGOTTEN = 4096  # finished request ids remembered to refuse late reads


class HoldState(Enum):
    HELD = "held"
    LENT = "lent"
    DONE = "done"
    EXPIRED = "expired"


@dataclass(slots=True)
class _Hold:
    spec: PeerHold
    deadline: float
    state: HoldState = HoldState.HELD


class HoldTable:
    """Held prefills and their deadlines (module docstring); every method is thread-safe."""

    def __init__(self, stats: WorkerStats, *, lend_grace_s: float) -> None:
        self._stats = stats
        self._lend_grace_s = lend_grace_s
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold] = {}
        self._finished: OrderedDict[str, HoldState] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            return request_id in self._holds

    def hold(self, spec: PeerHold, now: float) -> None:
        with self._lock:
            self._holds[spec.request_id] = _Hold(spec, now + spec.timeout_s)
            self._stats.num_holds += 1

    def lend(
        self, request_id: str, token_ids: list[int], now: float
    ) -> PeerHold | tuple[ErrorCode, str]:
        """The hold a consumer may read, or why not (``UNAVAILABLE`` means: not yet, retry)."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None:
                state = self._finished.get(request_id)
                if state is not None:
                    return ErrorCode.UNKNOWN_REQUEST, f"request {request_id} was {state.value}"
                return ErrorCode.UNAVAILABLE, f"request {request_id} is not held (yet)"
            if hold.state not in (HoldState.HELD, HoldState.LENT):
                return ErrorCode.UNKNOWN_REQUEST, f"request {request_id} is {hold.state.value}"
            spec = hold.spec
            if len(token_ids) != spec.num_tokens or token_digest(token_ids) != spec.token_digest:
                return (
                    ErrorCode.UNKNOWN_REQUEST,
                    f"request {request_id} holds another prompt ({spec.num_tokens} tokens)",
                )
            hold.state = HoldState.LENT
            hold.deadline = max(hold.deadline, now + self._lend_grace_s)
            return spec

    def release(self, request_id: str) -> bool:
        """The consumer is done with (or gave up on) the blocks; False if not held."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.state not in (HoldState.HELD, HoldState.LENT):
                return False
            hold.state = HoldState.DONE
            self._stats.num_holds_released += 1
            return True

    def collect(self, now: float) -> list[str]:
        """Remove and return the requests whose blocks may be freed (done or expired)."""
        freed: list[str] = []
        with self._lock:
            for request_id, hold in list(self._holds.items()):
                if hold.state is not HoldState.DONE and now >= hold.deadline:
                    logger.warning(
                        "request %s: no consumer released its %d blocks within the hold "
                        "timeout; freeing them",
                        request_id,
                        len(hold.spec.block_ids),
                    )
                    hold.state = HoldState.EXPIRED
                    self._stats.num_holds_expired += 1
                if hold.state in (HoldState.DONE, HoldState.EXPIRED):
                    del self._holds[request_id]
                    self._finished[request_id] = hold.state
                    freed.append(request_id)
            while len(self._finished) > _MAX_FORGOTTEN:
                self._finished.popitem(last=False)
        return freed

    def expire_all(self) -> list[str]:
        """Free every hold now (shutdown)."""
        with self._lock:
            ids = list(self._holds)
            for hold in self._holds.values():
                hold.state = HoldState.EXPIRED
        return self.collect(time.monotonic()) if ids else []


class ProducerEndpoint:
    """Serves this instance's held prefills to consumers (module docstring)."""

    def __init__(
        self,
        *,
        worker_id: str,
        geometry: PageGeometry,
        agent: TransferAgent,
        storage: Storage,
        holds: HoldTable,
        signal_host: str,
    ) -> None:
        self._holds = holds
        self._compat = geometry.compat_hash
        layout = storage.layout
        self._template = RemoteBlockSet(
            REMOTE_BLOCK_SET_VERSION,
            agent.name,
            agent.metadata(),
            layout,
            tuple(
                RemoteBuffer(b.address, b.nbytes, b.kind, b.device_id) for b in storage.buffers()
            ),
            (),
            self._compat,
        )
        self._server = SignalServer(
            f"tcp://{signal_host}:0", self._handle, compat_hash=self._compat, name=worker_id
        )
        logger.info(
            "P/D producer %s: signals on %s, NIXL agent %s",
            worker_id,
            self._server.endpoint,
            agent.name,
        )

    @property
    def endpoint(self) -> str:
        return self._server.endpoint

    def _handle(self, message: Message, peer: PeerId) -> Message | None:
        if isinstance(message, PrefillRequest):
            lent = self._holds.lend(message.request_id, message.token_ids, time.monotonic())
            if isinstance(lent, tuple):
                code, text = lent
                return ErrorReply(message.request_id, code, text)
            block_set = dataclasses.replace(self._template, block_ids=lent.block_ids)
            logger.debug(
                "lending %d blocks of %s to %s", len(lent.block_ids), message.request_id, peer
            )
            return BlocksReady(
                request_id=lent.request_id,
                first_token=0,
                agent_name=self._template.agent_name,
                block_set=block_set.to_bytes(),
                num_tokens=lent.num_tokens,
            )
        if isinstance(message, TransferDone | Abort):
            if not self._holds.release(message.request_id):
                logger.debug("%s released %s, which is not held", peer, message.request_id)
            return None
        return ErrorReply(None, ErrorCode.UNKNOWN_TYPE, f"{type(message).__name__} not served here")

    def close(self) -> None:
        """Stop serving (leave etcd first: the worker closes the registration before this)."""
        self._server.close()
