"""``LoopbackAgent``: an in-process ``TransferAgent`` for fast unit tests (no NIXL, no UCX).

Agents built on one ``LoopbackRegistry`` find each other by name through it, the way NIXL agents
find each other through metadata: ``metadata()`` is a small blob naming the registry and
the agent, and ``add_peer`` resolves it. Memory is copied with ``ctypes.memmove``; FILE regions
(``address`` = file offset, ``device_id`` = fd) with ``os.preadv`` / ``os.pwritev``. VRAM is not
supported.

Faults, for tests of the failure paths:

* ``close()`` detaches an agent: its peers' transfers and notifications then raise (or fail
  with) ``PeerUnavailable``, as with a dead NIXL peer;
* ``registry.pause(name)`` stalls an agent: transfers with it stay PENDING (so ``wait`` times
  out) until ``registry.resume(name)``; the copy happens at the first poll after that.

Invariants: the contract of ``fabric/transfer/agent.py``, checked the way NIXL checks it: local
regions must lie inside this agent's registrations and remote ones inside the peer's (``read`` /
``write`` raise ``TransferError`` otherwise), a transfer's bytes and its notification land
together, and a released pending transfer never copies.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fabric.errors import InvalidInput, InvalidTransition, PeerUnavailable, TransferError
from fabric.transfer.agent import (
    AgentConfig,
    Registration,
    Transfer,
    TransferOp,
    TransferState,
    TransferTable,
    check_transfer_args,
    wait_for,
)
from fabric.transfer.memory import BufferInfo, MemoryKind, RegionList

_MAGIC = b"fabric-loopback"
_registry_ids = itertools.count(1)


class LoopbackRegistry:
    """The agents of one process that can reach each other, and which of them are stalled."""

    def __init__(self) -> None:
        self.id = next(_registry_ids)
        self._agents: dict[str, LoopbackAgent] = {}
        self._paused: set[str] = set()

    def attach(self, agent: LoopbackAgent) -> None:
        if agent.name in self._agents:
            raise InvalidInput(f"an agent named {agent.name!r} is already attached")
        self._agents[agent.name] = agent

    def detach(self, name: str) -> None:
        self._agents.pop(name, None)
        self._paused.discard(name)

    def lookup(self, name: str) -> LoopbackAgent | None:
        return self._agents.get(name)

    def pause(self, name: str) -> None:
        """Stall ``name``: transfers with it stay PENDING until ``resume``."""
        self._paused.add(name)

    def resume(self, name: str) -> None:
        self._paused.discard(name)

    def paused(self, name: str) -> bool:
        return name in self._paused


@dataclass(slots=True)
class _Pending:
    """What a loopback transfer still has to do (nothing once done)."""

    src: RegionList
    dst: RegionList
    target: str
    notify: bytes | None


class LoopbackAgent:
    """A ``TransferAgent`` whose peers are other ``LoopbackAgent``s on the same registry."""

    def __init__(
        self, name: str, registry: LoopbackRegistry, config: AgentConfig | None = None
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"agent name {name!r} must be a non-empty str")
        self._name = name
        self._registry = registry
        self._config = config or AgentConfig()
        self._registrations: dict[int, Registration] = {}
        self._next_registration = 1
        self._peers: set[str] = set()
        self._inbox: list[tuple[str, bytes]] = []
        self._transfers: TransferTable[_Pending] = TransferTable(name)
        self._closed = False
        registry.attach(self)

    @property
    def name(self) -> str:
        return self._name

    @property
    def num_live_transfers(self) -> int:
        """Transfers posted and not yet released (for leak checks)."""
        return len(self._transfers.live())

    # -- memory ---------------------------------------------------------------------------------

    def register(self, buffers: Sequence[BufferInfo]) -> Registration:
        buffers = tuple(buffers)
        self._check_open()
        if not buffers or not all(isinstance(b, BufferInfo) for b in buffers):
            raise InvalidInput("register needs a non-empty sequence of BufferInfo")
        if any(b.kind is MemoryKind.VRAM for b in buffers):
            raise InvalidInput("LoopbackAgent cannot register VRAM; use NixlAgent")
        registration = Registration(self._next_registration, self._name, buffers)
        self._next_registration += 1
        self._registrations[registration.id] = registration
        return registration

    def deregister(self, registration: Registration) -> None:
        if self._registrations.get(registration.id) != registration:
            raise InvalidTransition(
                f"registration {registration.id} is not live on agent {self._name!r}"
            )
        del self._registrations[registration.id]

    def covers(self, regions: RegionList) -> bool:
        """Whether every region lies inside one registered buffer of its kind and device."""
        bufs = [
            b for r in self._registrations.values() for b in r.buffers if b.kind is regions.kind
        ]
        ends = regions.addresses + regions.lengths
        inside = np.zeros(len(regions), dtype=bool)
        for b in bufs:
            inside |= (
                (regions.device_ids == b.device_id)
                & (regions.addresses >= b.address)
                & (ends <= b.address + b.nbytes)
            )
        return bool(inside.all())

    # -- peers ----------------------------------------------------------------------------------

    def metadata(self) -> bytes:
        self._check_open()
        return b"\0".join([_MAGIC, str(self._registry.id).encode(), self._name.encode()])

    def add_peer(self, metadata: bytes) -> str:
        self._check_open()
        parts = metadata.split(b"\0", 2) if isinstance(metadata, bytes) else []
        if len(parts) != 3 or parts[0] != _MAGIC:
            raise InvalidInput("peer metadata is not a LoopbackAgent's metadata()")
        if parts[1] != str(self._registry.id).encode():
            raise InvalidInput("peer metadata comes from an agent on another LoopbackRegistry")
        name = parts[2].decode()
        if self._registry.lookup(name) is None:
            raise PeerUnavailable(f"peer {name!r} is not attached to the registry (closed?)")
        self._peers.add(name)
        return name

    def remove_peer(self, name: str) -> None:
        if name not in self._peers:
            raise PeerUnavailable(f"agent {self._name!r} has no peer named {name!r}")
        self._peers.discard(name)

    def _peer(self, name: str) -> LoopbackAgent:
        self._check_open()
        if name != self._name and name not in self._peers:
            raise PeerUnavailable(
                f"agent {self._name!r} does not know peer {name!r}; add_peer its metadata first "
                f"(known: {sorted(self._peers)})"
            )
        agent = self._registry.lookup(name)
        if agent is None:
            raise PeerUnavailable(f"peer {name!r} went away (its agent was closed)")
        return agent

    # -- transfers ------------------------------------------------------------------------------

    def read(
        self, local: RegionList, remote: RegionList, peer: str, *, notify: bytes | None = None
    ) -> Transfer:
        return self._post(TransferOp.READ, local, remote, peer, notify)

    def write(
        self, local: RegionList, remote: RegionList, peer: str, *, notify: bytes | None = None
    ) -> Transfer:
        return self._post(TransferOp.WRITE, local, remote, peer, notify)

    def _post(
        self,
        op: TransferOp,
        local: RegionList,
        remote: RegionList,
        peer: str,
        notify: bytes | None,
    ) -> Transfer:
        check_transfer_args(local, remote, notify)
        target = self._peer(peer)
        if MemoryKind.VRAM in (local.kind, remote.kind):
            raise InvalidInput("LoopbackAgent cannot move VRAM; use NixlAgent")
        if MemoryKind.FILE is local.kind is remote.kind:
            raise InvalidInput("FILE <-> FILE transfers are not supported; stage through DRAM")
        for side, owner in ((local, self), (remote, target)):
            if not owner.covers(side):
                raise TransferError(
                    f"{op.value} with {peer!r}: regions outside the registered memory of "
                    f"{owner.name!r} (register it; for a peer, add_peer its current metadata)"
                )
        src, dst = (remote, local) if op is TransferOp.READ else (local, remote)
        pending = _Pending(src, dst, peer, notify)
        transfer = self._transfers.add(op, peer, local, pending)
        self._progress(transfer, pending)
        return transfer

    def _progress(self, transfer: Transfer, pending: _Pending) -> None:
        if transfer.state is not TransferState.PENDING or self._registry.paused(pending.target):
            return
        target = self._registry.lookup(pending.target)
        if target is None:
            transfer.state = TransferState.FAILED
            transfer.error = PeerUnavailable(f"{transfer.describe()}: the peer went away")
            return
        try:
            _copy(pending.src, pending.dst)
        except OSError as e:
            transfer.state = TransferState.FAILED
            transfer.error = TransferError(f"{transfer.describe()}: file I/O failed: {e}")
            return
        if pending.notify is not None:
            target._inbox.append((self._name, pending.notify))
        transfer.state = TransferState.DONE

    def poll(self, transfer: Transfer) -> TransferState:
        self._progress(transfer, self._transfers.handle(transfer))
        return transfer.state

    def wait(self, transfer: Transfer, timeout_s: float) -> None:
        wait_for(self, transfer, timeout_s, self._config)

    def release(self, transfer: Transfer) -> None:
        self._transfers.pop(transfer)

    # -- notifications --------------------------------------------------------------------------

    def notifications(self) -> list[tuple[str, bytes]]:
        received, self._inbox = self._inbox, []
        return received

    def send_notification(self, peer: str, message: bytes) -> None:
        if not isinstance(message, bytes):
            raise InvalidInput(f"message must be bytes, got {type(message).__name__}")
        self._peer(peer)._inbox.append((self._name, message))

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        for transfer in self._transfers.live():
            self.release(transfer)
        self._registrations.clear()
        self._peers.clear()
        self._registry.detach(self._name)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"loopback agent {self._name!r} is closed")


def _copy(src: RegionList, dst: RegionList) -> None:
    rows = zip(
        src.addresses.tolist(),
        src.device_ids.tolist(),
        dst.addresses.tolist(),
        dst.device_ids.tolist(),
        src.lengths.tolist(),
        strict=True,
    )
    for src_addr, src_dev, dst_addr, dst_dev, n in rows:
        if src.kind is MemoryKind.FILE:
            _pread_all(src_dev, _memory(dst_addr, n), src_addr)
        elif dst.kind is MemoryKind.FILE:
            _pwrite_all(dst_dev, _memory(src_addr, n), dst_addr)
        else:
            ctypes.memmove(dst_addr, src_addr, n)


def _memory(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise TransferError(f"fd {fd} ended at offset {offset + done}")
        done += n


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
