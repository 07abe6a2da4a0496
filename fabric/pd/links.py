"""The consumer's signal links to producers: one ``SignalClient`` per producer worker.

``ProducerLinks`` finds a producer in the worker directory (``find``, or ``wait_for`` with a
bound), checks that it can serve this consumer (a KV source role, a signal endpoint, the same
compatibility hash) and keeps one link to it (``link``), identified by this consumer's worker id.
Both engines' consumers use it: the reference engine's decode worker asks prefill workers for
prefills over it (``fabric.worker.remote_prefill``), vLLM's connector asks producer instances
for held prefills (``fabric.integrations.vllm.consumer``).

Invariants:

* At most one open link per producer, to the endpoint its current record names: a producer that
  re-registered on another endpoint (a restart) gets a fresh link, the old one is closed.
* A link whose send failed is dropped (``send`` returns False, logged); the next ``link``
  reconnects. Nothing here raises on a failed one-way send: the producer's hold deadline frees
  what it holds.
* Not thread-safe: one owner thread (ZeroMQ sockets are not).
"""

from __future__ import annotations

import logging

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Role
from fabric.errors import FabricError, PeerUnavailable, ProtocolMismatch
from fabric.signal.client import SignalClient
from fabric.signal.messages import Message

logger = logging.getLogger(__name__)

KV_SOURCE_ROLES = (Role.PREFILL, Role.AGGREGATED)
"""Roles that offer KV to consumers: prefill workers, and aggregated workers for peer hits."""


class ProducerLinks:
    """Links from one consumer to the producers it reads from (module docstring)."""

    def __init__(
        self,
        directory: WorkerDirectory,
        *,
        identity: str,
        compat_hash: int,
        request_timeout_s: float = 5.0,
    ) -> None:
        self._directory = directory
        self._identity = identity
        self._compat_hash = compat_hash
        self._request_timeout_s = request_timeout_s
        self._worker_to_client: dict[str, tuple[str, SignalClient]] = {}

    def is_registered(self, worker_id: str) -> bool:
        return self._directory.get(worker_id) is not None

    def find(self, worker_id: str) -> WorkerRecord:
        """The producer's record, checked.

        Raises:
            PeerUnavailable: it is not registered, is not a KV source or has no signal endpoint.
            ProtocolMismatch: its compatibility hash differs from this consumer's.
        """
        record = self._directory.get(worker_id)
        if record is None:
            raise PeerUnavailable(f"producer {worker_id!r} is not registered (gone or not started)")
        if record.role not in KV_SOURCE_ROLES:
            raise PeerUnavailable(
                f"worker {worker_id!r} is a {record.role.value} worker: it offers no KV"
            )
        if record.compat_hash != self._compat_hash:
            raise ProtocolMismatch(
                f"producer {worker_id!r} has compatibility hash {record.compat_hash:#x}, this "
                f"worker {self._compat_hash:#x}: they serve different models or KV layouts"
            )
        if record.endpoints.signal is None:
            raise PeerUnavailable(f"producer {worker_id!r} publishes no signal endpoint")
        return record

    def wait_for(self, worker_id: str, timeout_s: float) -> WorkerRecord:
        """``find``, waiting up to ``timeout_s`` for the producer to register."""
        if self._directory.get(worker_id) is None:
            self._directory.wait_for(lambda workers: worker_id in workers, max(0.0, timeout_s))
        try:
            return self.find(worker_id)
        except PeerUnavailable as e:
            raise PeerUnavailable(f"{e} after {timeout_s:.1f} s; same namespace?") from e

    def link(self, worker_id: str) -> SignalClient:
        """The link to the producer ``find`` accepts (raises as ``find`` does)."""
        endpoint = self.find(worker_id).endpoints.signal
        assert endpoint is not None  # find checked it
        entry = self._worker_to_client.get(worker_id)
        if entry is not None and entry[0] == endpoint:
            return entry[1]
        self.drop(worker_id)
        client = SignalClient(
            endpoint,
            identity=self._identity,
            compat_hash=self._compat_hash,
            timeout_s=self._request_timeout_s,
        )
        self._worker_to_client[worker_id] = (endpoint, client)
        logger.info("connected to producer %s at %s", worker_id, endpoint)
        return client

    def open_link(self, worker_id: str) -> SignalClient | None:
        """The link already open to ``worker_id``, if any (no directory lookup)."""
        entry = self._worker_to_client.get(worker_id)
        return entry[1] if entry is not None else None

    def send(self, worker_id: str, message: Message) -> bool:
        """Send one-way over the open link; False (logged, link dropped) when that failed or
        there is no link."""
        client = self.open_link(worker_id)
        if client is None:
            return False
        try:
            client.send(message)
        except FabricError as exc:
            logger.warning(
                "could not send %s to producer %s: %s", type(message).__name__, worker_id, exc
            )
            self.drop(worker_id)
            return False
        return True

    def receive(self, worker_id: str, timeout_s: float) -> Message | None:
        """The next message pushed over the open link (None: none within ``timeout_s``, no
        link, or an undecodable message, logged)."""
        client = self.open_link(worker_id)
        if client is None:
            return None
        try:
            return client.receive(timeout_s)
        except FabricError as exc:
            logger.warning("dropped a message from producer %s: %s", worker_id, exc)
            return None

    def drop(self, worker_id: str) -> None:
        entry = self._worker_to_client.pop(worker_id, None)
        if entry is not None:
            entry[1].close()

    def close(self) -> None:
        """Close every link (idempotent)."""
        for worker_id in list(self._worker_to_client):
            self.drop(worker_id)
