"""``NixlAgent``: the ``TransferAgent`` protocol over NIXL (UCX for memory, POSIX for files).

NIXL is imported when the first agent is built (``nixl``, else the ``nixl_cu12`` / ``nixl_cu13``
wheels' module), so importing this module never needs it; a missing NIXL is a ``FabricError``
that says how to install it; ``load_nixl`` sets UCX's options first (``fabric.transfer.ucx_env``).
The backend is chosen per transfer: POSIX when either side is a FILE region, UCX otherwise (DRAM
and VRAM).

Descriptor lists are built per call (``initialize_xfer`` from the region arrays), not prepped.
Measured here (64 MiB READ between two processes over shared memory, scattered whole blocks,
median of 20): per-call 2.31 / 3.67 / 3.54 GB/s vs ``prep_xfer_dlist`` once +
``make_prepped_xfer`` per round 2.43 / 3.58 / 3.60 GB/s for 16 KiB / 256 KiB / 2 MiB blocks,
i.e. within run-to-run noise; building a request costs about 0.2 ms for 4096 descriptors. The
cost is in posting descriptors (about 5 us each), which coalescing attacks, and a prepped list
would tie the agent to block indices the transfer layer must not know.

Dead peers. UCX reads shared memory with CMA (``process_vm_readv``) inside the post call (so
``read`` returns with the bytes moved and ``wait`` finds it DONE), and a peer killed before or
during a transfer makes the post fail at once with
``nixlRemoteDisconnectError`` (raised here as ``PeerUnavailable``); a transport that completes
asynchronously reports ``ERR`` from ``check_xfer_state`` (``TransferError``), and one that just
stalls is cut by ``wait``'s deadline (``TransferTimeout``). Every path releases the handle; a
handle NIXL refuses to release (a transfer it cannot cancel) is kept and released again on
later polls and at ``close``.

Peers are known by the agent name their metadata carries (read from NIXL's serialized form
before loading it): loading new metadata under a known name removes the old peer first, so a
peer restarted under its old name is reachable again (NIXL refuses to load a second
connection under one name). Replace a peer between transfers to it (``wait`` releases them).

Invariants: see ``fabric/transfer/agent.py``. ``close`` releases transfers, deregisters memory,
forgets peers and drops the NIXL agent; it is idempotent, and the agent is unusable after it.
"""

from __future__ import annotations

import importlib
import logging
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import fabric.transfer.metrics as transfer_metrics
from fabric.errors import (
    ConfigError,
    FabricError,
    InvalidInput,
    InvalidTransition,
    PeerUnavailable,
    TransferError,
)
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
from fabric.transfer.metrics import TransferOutcome
from fabric.transfer.ucx_env import prepare_process

logger = logging.getLogger(__name__)

_NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")
_NIXL_STATE = {"DONE": TransferState.DONE, "PROC": TransferState.PENDING}
_METADATA_HEAD = b"nixlSerDes|Agent"


def load_nixl() -> ModuleType:
    """NIXL's Python API module (``nixl._api`` or a CUDA-flavoured wheel's equivalent).

    Sets the UCX options NIXL needs first (``fabric.transfer.ucx_env``: without them a process
    dies with SIGSEGV at exit on hosts with the RDMA libraries), so load NIXL only through here.
    """
    prepare_process()
    for name in _NIXL_MODULES:
        try:
            return importlib.import_module(f"{name}._api")
        except ImportError:
            continue
    raise FabricError(
        "NIXL is not installed: install torch first, then `pip install --no-deps "
        "nixl-cu12==1.5.1` (see launch/setup.sh), or use LoopbackAgent in tests"
    )


def _agent_name(metadata: bytes) -> str | None:
    """The agent name NIXL's serialized metadata opens with (``nixlSerDes|Agent``, the name's
    length as a little-endian u64, the name), or None when it does not open that way."""
    start = len(_METADATA_HEAD) + 8
    if not metadata.startswith(_METADATA_HEAD) or len(metadata) < start:
        return None
    (length,) = struct.unpack_from("<Q", metadata, len(_METADATA_HEAD))
    name = metadata[start : start + length]
    if len(name) != length:
        return None
    try:
        return name.decode()
    except UnicodeDecodeError:
        return None


def _outcome_of(error: TransferError | None, otherwise: TransferOutcome) -> TransferOutcome:
    """A dead or unknown peer, else ``otherwise`` (the metrics' error kinds)."""
    return TransferOutcome.PEER_UNAVAILABLE if isinstance(error, PeerUnavailable) else otherwise


def _is_nixl_error(e: BaseException) -> bool:
    return type(e).__module__.endswith("._bindings") and type(e).__name__.startswith("nixl")


def _translate(e: Exception, what: str) -> FabricError:
    kind = type(e).__name__
    if kind == "nixlRemoteDisconnectError":
        return PeerUnavailable(f"{what}: the peer disconnected (its process is gone?)")
    if kind == "nixlNotFoundError":
        return TransferError(
            f"{what}: NIXL found no registration covering the regions (register local memory "
            "first; for remote regions add_peer the peer's current metadata)"
        )
    if kind in ("nixlInvalidParamError", "nixlMismatchError"):
        return InvalidInput(f"{what}: NIXL refused the arguments ({e})")
    return TransferError(f"{what}: NIXL error {kind} ({e})")


@contextmanager
def _nixl_errors(what: str) -> Iterator[None]:
    """Re-raise NIXL's exceptions as ``FabricError``s that say what was being done."""
    try:
        yield
    except Exception as e:
        if _is_nixl_error(e):
            raise _translate(e, what) from e
        raise


class NixlAgent:
    """A ``TransferAgent`` over one NIXL agent named ``name`` (unique among its peers)."""

    def __init__(self, name: str, config: AgentConfig | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"agent name {name!r} must be a non-empty str")
        api = load_nixl()
        self._config = config or AgentConfig()
        cfg = self._config
        nixl_conf = api.nixl_agent_config(
            enable_prog_thread=cfg.progress_thread,
            enable_listen_thread=cfg.listen_thread,
            num_threads=cfg.num_threads,
            backends=[],
            capture_telemetry=cfg.telemetry,
        )
        with _nixl_errors(f"creating NIXL agent {name!r}"):
            agent = api.nixl_agent(name, nixl_conf)
            missing = [b for b in cfg.backends if b not in agent.plugin_list]
            if missing:
                raise ConfigError(
                    f"NIXL has no plugin for backends {missing}; available: {agent.plugin_list}"
                )
            for backend in cfg.backends:
                agent.create_backend(backend, cfg.params(backend))
        self._agent: Any = agent
        self._name = name
        self._transfers: TransferTable[Any] = TransferTable(name)
        self._registrations: dict[int, tuple[Registration, list[tuple[Any, list[str]]]]] = {}
        self._next_registration = 1
        self._peer_metadata: dict[str, bytes] = {}
        self._unreleased: list[Any] = []
        self._id_to_posted: dict[int, tuple[str, float]] = {}  # backend, time.monotonic()
        logger.info("NIXL agent %s up (backends %s)", name, ", ".join(cfg.backends))

    @property
    def name(self) -> str:
        return self._name

    @property
    def num_live_transfers(self) -> int:
        """Transfers posted and not yet released (for leak checks)."""
        return len(self._transfers.live())

    @property
    def _nixl(self) -> Any:
        if self._agent is None:
            raise TransferError(f"NIXL agent {self._name!r} is closed")
        return self._agent

    # -- memory ---------------------------------------------------------------------------------

    def register(self, buffers: Sequence[BufferInfo]) -> Registration:
        """Register buffers: memory with every backend that takes it, files with POSIX."""
        buffers = tuple(buffers)
        if not buffers or not all(isinstance(b, BufferInfo) for b in buffers):
            raise InvalidInput("register needs a non-empty sequence of BufferInfo")
        agent, done = self._nixl, []
        try:
            for kind in MemoryKind:
                rows = [
                    (b.address, b.nbytes, b.device_id, b.path or "")
                    for b in buffers
                    if b.kind is kind
                ]
                if rows:
                    backends = [self._backend_for(kind, kind)] if kind is MemoryKind.FILE else []
                    with _nixl_errors(f"registering {len(rows)} {kind.value} buffers"):
                        done.append((agent.register_memory(rows, kind.value, backends), backends))
        except BaseException:
            for descs, backends in done:
                agent.deregister_memory(descs, backends)
            raise
        registration = Registration(self._next_registration, self._name, buffers)
        self._next_registration += 1
        self._registrations[registration.id] = (registration, done)
        logger.debug("%s registered %d buffers", self._name, len(buffers))
        return registration

    def deregister(self, registration: Registration) -> None:
        entry = self._registrations.get(registration.id)
        if entry is None or entry[0] != registration:
            raise InvalidTransition(
                f"registration {registration.id} is not live on agent {self._name!r}"
            )
        del self._registrations[registration.id]
        for descs, backends in entry[1]:
            with _nixl_errors(f"deregistering registration {registration.id}"):
                self._nixl.deregister_memory(descs, backends)

    # -- peers ----------------------------------------------------------------------------------

    def metadata(self) -> bytes:
        with _nixl_errors("reading local metadata"):
            return bytes(self._nixl.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata; a known peer's changed metadata replaces the old (NIXL
        refuses a second load under one name once the peer restarted), the same is a no-op."""
        if not isinstance(metadata, bytes) or not metadata:
            raise InvalidInput("peer metadata must be non-empty bytes from metadata()")
        known_name = _agent_name(metadata)
        if known_name in self._peer_metadata:
            if self._peer_metadata[known_name] == metadata:
                return known_name
            logger.info(
                "%s: peer %s sent new metadata (restarted, or new registrations); replacing it",
                self._name,
                known_name,
            )
            self.remove_peer(known_name)
        try:
            with _nixl_errors("loading peer metadata"):
                raw = self._nixl.add_remote_agent(metadata)
        except InvalidInput:
            raise
        except TransferError as e:  # well-formed metadata whose backend endpoints don't answer
            raise PeerUnavailable(f"{e}; the peer's process is gone or unreachable") from e
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._peer_metadata[name] = metadata
        logger.debug("%s added peer %s", self._name, name)
        return name

    def remove_peer(self, name: str) -> None:
        if self._peer_metadata.pop(name, None) is None:
            raise PeerUnavailable(f"agent {self._name!r} has no peer named {name!r}")
        with _nixl_errors(f"removing peer {name!r}"):
            self._nixl.remove_remote_agent(name)

    def _check_peer(self, peer: str) -> None:
        if peer != self._name and peer not in self._peer_metadata:
            raise PeerUnavailable(
                f"agent {self._name!r} does not know peer {peer!r}; add_peer its metadata first "
                f"(known: {sorted(self._peer_metadata)})"
            )

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
        agent = self._nixl
        backend = self._backend_for(local.kind, remote.kind)
        what = f"{op.value} of {local.nbytes} bytes in {len(local)} descriptors with {peer!r}"
        posted_at = time.monotonic()
        try:
            self._check_peer(peer)
            with _nixl_errors(what):
                handle = agent.initialize_xfer(
                    op.value,
                    agent.get_xfer_descs(local.descs(), local.kind.value),
                    agent.get_xfer_descs(remote.descs(), remote.kind.value),
                    peer,
                    notify or b"",
                    [backend],
                )
        except TransferError as e:
            transfer_metrics.record_error(op.value, _outcome_of(e, TransferOutcome.POST_FAILED))
            raise
        try:
            with _nixl_errors(what):
                status = agent.transfer(handle)
            if status not in _NIXL_STATE:
                raise TransferError(f"{what}: NIXL could not post it (state {status})")
        except BaseException as e:
            self._release_handle(handle)
            if isinstance(e, TransferError):
                transfer_metrics.record_error(op.value, _outcome_of(e, TransferOutcome.POST_FAILED))
            raise
        transfer = self._transfers.add(op, peer, local, handle)
        self._id_to_posted[transfer.id] = (backend, posted_at)
        transfer.state = _NIXL_STATE[status]
        logger.debug("%s posted %s: %s", self._name, transfer.describe(), status)
        return transfer

    def _backend_for(self, local: MemoryKind, remote: MemoryKind) -> str:
        backend = "POSIX" if MemoryKind.FILE in (local, remote) else "UCX"
        if backend not in self._config.backends:
            raise ConfigError(
                f"moving {local.value} <-> {remote.value} needs the {backend} backend; add it to "
                f"AgentConfig.backends (now {list(self._config.backends)})"
            )
        return backend

    def poll(self, transfer: Transfer) -> TransferState:
        handle = self._transfers.handle(transfer)
        self._retry_unreleased()
        if transfer.state is not TransferState.PENDING:
            return transfer.state
        try:
            with _nixl_errors(transfer.describe()):
                status = self._nixl.check_xfer_state(handle)
        except TransferError as e:
            transfer.state, transfer.error = TransferState.FAILED, e
            return transfer.state
        state = _NIXL_STATE.get(status)
        if state is None:
            transfer.state = TransferState.FAILED
            transfer.error = TransferError(
                f"{transfer.describe()} failed (NIXL state {status}; did the peer die?)"
            )
        else:
            transfer.state = state
        return transfer.state

    def wait(self, transfer: Transfer, timeout_s: float) -> None:
        wait_for(self, transfer, timeout_s, self._config)

    def release(self, transfer: Transfer) -> None:
        """Release (and, if still pending, cancel) a transfer; a spent one raises. Its
        outcome goes to ``fabric.transfer.metrics`` (NIXL's telemetry for a completed one)."""
        handle = self._transfers.pop(transfer)
        backend, posted_at = self._id_to_posted.pop(transfer.id)
        op = transfer.op.value
        if transfer.state is TransferState.DONE:
            nbytes, seconds, num_descs = self._telemetry(handle)
            if nbytes is None:  # no telemetry: the agent's own figures
                nbytes, seconds = transfer.nbytes, time.monotonic() - posted_at
                num_descs = transfer.num_descs
            transfer_metrics.record_done(op, backend, nbytes, seconds, num_descs)
        elif transfer.state is TransferState.FAILED:
            transfer_metrics.record_error(op, _outcome_of(transfer.error, TransferOutcome.FAILED))
        else:
            transfer_metrics.record_error(op, TransferOutcome.CANCELLED)
        self._release_handle(handle)

    def _telemetry(self, handle: Any) -> tuple[int | None, float, int]:
        """NIXL's (bytes, seconds, descriptors) of a completed transfer; bytes None without."""
        if not self._config.telemetry:
            return None, 0.0, 0
        try:
            telemetry = self._nixl.get_xfer_telemetry(handle)
        except Exception as e:
            if not _is_nixl_error(e):
                raise
            logger.debug("no NIXL telemetry for a transfer: %s", e)
            return None, 0.0, 0
        return int(telemetry.totalBytes), telemetry.xferDuration / 1e6, int(telemetry.descCount)

    def _release_handle(self, handle: Any) -> None:
        try:
            handle.release()
        except Exception as e:
            if not _is_nixl_error(e):
                raise
            logger.warning("NIXL kept a transfer handle (%s); retrying its release later", e)
            self._unreleased.append(handle)

    def _retry_unreleased(self) -> None:
        pending, self._unreleased = self._unreleased, []
        for handle in pending:
            self._release_handle(handle)

    # -- notifications --------------------------------------------------------------------------

    def notifications(self) -> list[tuple[str, bytes]]:
        with _nixl_errors("reading notifications"):
            received = self._nixl.get_new_notifs()
        return [(peer, bytes(msg)) for peer, msgs in received.items() for msg in msgs]

    def send_notification(self, peer: str, message: bytes) -> None:
        if not isinstance(message, bytes):
            raise InvalidInput(f"message must be bytes, got {type(message).__name__}")
        self._check_peer(peer)
        with _nixl_errors(f"notifying {peer!r}"):
            self._nixl.send_notif(peer, message)

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._agent is None:
            return
        for transfer in self._transfers.live():
            self.release(transfer)
        self._retry_unreleased()
        for registration, _ in list(self._registrations.values()):
            self.deregister(registration)
        for peer in list(self._peer_metadata):
            try:
                self.remove_peer(peer)
            except TransferError as e:
                logger.debug("removing peer %s at close: %s", peer, e)
        if self._unreleased:
            logger.warning("%d NIXL transfer handles could not be released", len(self._unreleased))
        self._unreleased = []
        self._agent = None
        logger.info("NIXL agent %s closed", self._name)
