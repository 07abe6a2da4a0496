"""The transfer agent protocol: register memory, exchange metadata, move region lists.

An agent knows memory regions, peers and descriptor lists; it never knows blocks (``kvbm``
turns blocks into ``RegionList`` pairs). Implementations: ``NixlAgent`` (NIXL: UCX for DRAM/VRAM,
POSIX for files) and ``LoopbackAgent`` (in-process fake for unit tests). Both pass one contract
suite (``tests/transfer/test_agent_contract.py``).

The verbs::

    register(buffers) -> Registration        deregister(registration)
    metadata() -> bytes                       add_peer(metadata) -> peer name; remove_peer(name)
    read / write(local, remote, peer, notify) -> Transfer
    poll(transfer) -> TransferState           wait(transfer, timeout_s)   release(transfer)
    notifications() -> [(peer, message)]      send_notification(peer, message)     close()

A transfer's lifecycle::

    read/write ──▶ PENDING ──poll──▶ DONE | FAILED
                      │                 │
                      └──── release ────┴──▶ released (spent: poll/release raise InvalidTransition)

Invariants: ``read`` moves ``remote[i]`` (on ``peer``) into ``local[i]``, ``write`` the other way;
the lists pair up (equal counts and lengths) and must lie in registered memory. ``metadata()``
describes the registrations made so far: a peer must load it again after new registrations
(``add_peer`` with new bytes under a known agent name replaces the old, a peer restarted under
its old name included; same bytes are a no-op). ``wait`` releases the transfer on every path
(done, failed, timed out), so a timeout never leaks a handle; a dead or unknown peer surfaces as
``PeerUnavailable`` (a ``TransferError``) from ``read``/``write``/``wait`` or
``send_notification``, never as a hang. Agents are not thread-safe: one owner thread; with
NIXL's progress thread off, polling (``poll``, ``wait``, ``notifications``) drives progress.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

from fabric.errors import (
    ConfigError,
    InvalidInput,
    InvalidTransition,
    TransferError,
    TransferTimeout,
)
from fabric.transfer.memory import BufferInfo, RegionList, check_pairs


class TransferOp(Enum):
    READ = "READ"
    WRITE = "WRITE"


class TransferState(Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Registration:
    """Buffers registered with one agent; hand it back to ``deregister``."""

    id: int
    agent_name: str
    buffers: tuple[BufferInfo, ...]


@dataclass(slots=True, eq=False)
class Transfer:
    """One posted READ or WRITE. The agent updates ``state``/``error``; callers only read them."""

    id: int
    op: TransferOp
    peer: str
    num_descs: int
    nbytes: int
    state: TransferState = TransferState.PENDING
    error: TransferError | None = None
    released: bool = False

    def describe(self) -> str:
        direction = "from" if self.op is TransferOp.READ else "to"
        return (
            f"transfer {self.id} ({self.op.value} {direction} {self.peer!r}, {self.nbytes} bytes "
            f"in {self.num_descs} descriptors)"
        )


def _default_backend_params() -> Mapping[str, Mapping[str, str]]:
    return MappingProxyType({"UCX": MappingProxyType({"ucx_error_handling_mode": "none"})})


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """How an agent is built; the defaults are what ENVIRONMENT.md measured on 2 cores.

    NIXL's progress thread off (it cost 3x bandwidth and 20x notification latency here), the
    listen thread off (it binds port 8888, so a second agent on the host fails), UCX with
    ``ucx_error_handling_mode=none`` (lets notifications use shared memory), UCX and POSIX.
    ``wait`` spins for ``poll_spin_s`` and then sleeps ``poll_sleep_s`` between polls.
    """

    progress_thread: bool = False
    listen_thread: bool = False
    backends: tuple[str, ...] = ("UCX", "POSIX")
    backend_params: Mapping[str, Mapping[str, str]] = field(default_factory=_default_backend_params)
    num_threads: int = 0
    poll_spin_s: float = 0.002
    poll_sleep_s: float = 0.0001
    telemetry: bool = True
    """NIXL captures each transfer's bytes and duration (``fabric.transfer.metrics``)."""

    def __post_init__(self) -> None:
        if not self.backends or not all(isinstance(b, str) and b for b in self.backends):
            raise ConfigError(f"backends={self.backends!r} must name at least one backend")
        unknown = set(self.backend_params) - set(self.backends)
        if unknown:
            raise ConfigError(
                f"backend_params name {sorted(unknown)}, which are not in backends="
                f"{list(self.backends)}; add them to backends or drop their params"
            )
        if self.num_threads < 0 or self.poll_spin_s < 0 or self.poll_sleep_s < 0:
            raise ConfigError("num_threads, poll_spin_s and poll_sleep_s must be >= 0")

    def params(self, backend: str) -> dict[str, str]:
        return dict(self.backend_params.get(backend, {}))


class TransferAgent(Protocol):
    """Moves bytes between registered memory of this process and of peers (module docstring)."""

    @property
    def name(self) -> str: ...

    def register(self, buffers: Sequence[BufferInfo]) -> Registration: ...

    def deregister(self, registration: Registration) -> None: ...

    def metadata(self) -> bytes: ...

    def add_peer(self, metadata: bytes) -> str: ...

    def remove_peer(self, name: str) -> None: ...

    def read(
        self, local: RegionList, remote: RegionList, peer: str, *, notify: bytes | None = None
    ) -> Transfer: ...

    def write(
        self, local: RegionList, remote: RegionList, peer: str, *, notify: bytes | None = None
    ) -> Transfer: ...

    def poll(self, transfer: Transfer) -> TransferState: ...

    def wait(self, transfer: Transfer, timeout_s: float) -> None: ...

    def release(self, transfer: Transfer) -> None: ...

    def notifications(self) -> list[tuple[str, bytes]]: ...

    def send_notification(self, peer: str, message: bytes) -> None: ...

    def close(self) -> None: ...


H = TypeVar("H")


class TransferTable(Generic[H]):
    """An agent's live transfers and their backend handles; spent transfers are refused."""

    def __init__(self, agent_name: str) -> None:
        self._agent_name = agent_name
        self._ids = itertools.count(1)
        self._live: dict[int, tuple[Transfer, H]] = {}

    def add(self, op: TransferOp, peer: str, local: RegionList, handle: H) -> Transfer:
        transfer = Transfer(next(self._ids), op, peer, len(local), local.nbytes)
        self._live[transfer.id] = (transfer, handle)
        return transfer

    def handle(self, transfer: Transfer) -> H:
        entry = self._live.get(transfer.id)
        if entry is None or entry[0] is not transfer:
            raise InvalidTransition(
                f"{transfer.describe()} was already released or belongs to another agent than "
                f"{self._agent_name!r}"
            )
        return entry[1]

    def pop(self, transfer: Transfer) -> H:
        handle = self.handle(transfer)
        del self._live[transfer.id]
        transfer.released = True
        return handle

    def live(self) -> list[Transfer]:
        return [t for t, _ in self._live.values()]


def check_transfer_args(local: RegionList, remote: RegionList, notify: bytes | None) -> None:
    """Raise ``InvalidInput`` unless ``local``/``remote``/``notify`` make a valid transfer."""
    if not isinstance(local, RegionList) or not isinstance(remote, RegionList):
        raise InvalidInput("local and remote must be RegionLists")
    check_pairs(local, remote)
    if not len(local):
        raise InvalidInput("nothing to transfer: the region lists are empty")
    if notify is not None and not isinstance(notify, bytes):
        raise InvalidInput(f"notify must be bytes or None, got {type(notify).__name__}")


def wait_for(
    agent: TransferAgent, transfer: Transfer, timeout_s: float, config: AgentConfig
) -> None:
    """Poll ``transfer`` until it is done; release it on every path.

    Spins for ``config.poll_spin_s`` (a transfer on shared memory finishes in microseconds), then
    sleeps ``config.poll_sleep_s`` between polls so a long wait does not hold a core.

    Raises:
        TransferTimeout: not done within ``timeout_s``.
        PeerUnavailable / TransferError: the transfer failed (``transfer.error``).
    """
    try:
        if timeout_s < 0:
            raise InvalidInput(f"timeout_s={timeout_s} must be >= 0")
        start = time.monotonic()
        deadline, spin_until = start + timeout_s, start + config.poll_spin_s
        while True:
            state = agent.poll(transfer)
            if state is TransferState.DONE:
                return
            if state is TransferState.FAILED:
                raise transfer.error or TransferError(f"{transfer.describe()} failed")
            now = time.monotonic()
            if now >= deadline:
                raise TransferTimeout(
                    f"{transfer.describe()} was not done after {timeout_s:.3f} s; it was "
                    "cancelled and released (is the peer alive and progressing?)"
                )
            if now >= spin_until:
                time.sleep(min(config.poll_sleep_s, deadline - now))
    finally:
        if not transfer.released:
            agent.release(transfer)
