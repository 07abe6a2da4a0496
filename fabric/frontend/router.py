"""``Router``: live workers from discovery, their signal connections and KV events; routing.

Owns, for one served model: a ``WorkerDirectory`` (joins, updates and leaves arrive from the
registry's watch, so no restart is needed), one ``WorkerConnection`` per decode or aggregated
worker, one ``KvEventSubscriber`` per prefill worker that publishes ``events``, the
``KvPrefixIndex`` they feed, and the in-flight count of every worker. The choices themselves are
``policy``'s.

Invariants:

* Eligible workers are the DECODE, AGGREGATED and PREFILL records whose ``layout["model"]`` is the
  served model name (records without one are accepted); others are ignored (logged once).
* A record that changes its endpoints, compat hash or ``started_at`` (a restart) is treated as a
  leave then a join: its connection fails its open requests, its index entries are forgotten.
* The in-flight count of a worker is the number of ``RoutedRequest``s holding it: a decode worker
  until the request ends, a prefill worker until the first chunk (its prefill is done then).
  ``RoutedRequest`` releases are idempotent, so a count never goes negative.
* ``submit`` and the directory callback take one lock, so a request is never handed to a
  connection after the connection was closed (it would wait for nothing).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from fabric.discovery.registration import WorkerDirectory, WorkerEvent, WorkerEventKind
from fabric.discovery.registry import DEFAULT_NAMESPACE, Registry, Role, WorkerRecord
from fabric.frontend.connection import ChunkStream, WorkerConnection
from fabric.frontend.errors import no_workers
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.kv_subscriber import KvEventSubscriber
from fabric.frontend.policy import PrefillChoice, choose_decode, choose_prefill
from fabric.signal.messages import GenerateRequest

logger = logging.getLogger(__name__)

SERVING_ROLES = (Role.DECODE, Role.AGGREGATED)
ROUTED_ROLES = (Role.PREFILL, Role.DECODE, Role.AGGREGATED)


class RoutedRequest:
    """One request in flight on its chosen workers; ``stream`` yields the worker's chunks."""

    def __init__(
        self,
        router: Router,
        request: GenerateRequest,
        connection: WorkerConnection,
        prefill: PrefillChoice | None,
        stream: ChunkStream,
    ) -> None:
        self.request = request
        self.decode = connection.record
        self.prefill = prefill
        self.stream = stream
        self._router = router
        self._connection = connection
        self._holds_prefill = prefill is not None
        self._holds_decode = True

    def prefill_done(self) -> None:
        """Release the prefill worker's in-flight slot (idempotent)."""
        if self._holds_prefill and self.prefill is not None:
            self._holds_prefill = False
            self._router._release(self.prefill.record.worker_id)

    def finish(self) -> None:
        """Release every slot this request holds (idempotent)."""
        self.prefill_done()
        if self._holds_decode:
            self._holds_decode = False
            self._router._release(self.decode.worker_id)

    def abort(self, reason: str) -> None:
        """Tell the worker to stop (``Abort``) and release the slots."""
        self._connection.abort(self.request.request_id, reason)
        self.finish()


class Router:
    """Live workers of one model and the routing of requests to them (see module docstring)."""

    def __init__(
        self,
        registry: Registry,
        *,
        model_name: str,
        identity: str,
        namespace: str = DEFAULT_NAMESPACE,
        max_chunks: int = 4096,
    ) -> None:
        """Args:
        identity: this frontend's id: the signal client identity workers push chunks to.
        max_chunks: chunks a request's stream may hold before its reader is declared too slow.
        """
        self.model_name = model_name
        self.identity = identity
        self.index = KvPrefixIndex()
        self._max_chunks = max_chunks
        self._lock = threading.Lock()
        self._connections: dict[str, WorkerConnection] = {}
        self._prefills: dict[str, WorkerRecord] = {}
        self._subscribers: dict[str, KvEventSubscriber] = {}
        self._load: dict[str, int] = {}
        self._ignored: set[str] = set()
        self._directory = WorkerDirectory(registry, namespace=namespace, on_change=self._on_change)

    def start(self) -> Router:
        """Start watching the registry (existing workers arrive as joins)."""
        self._directory.start()
        return self

    def close(self) -> None:
        """Stop watching; close every connection (open requests fail) and subscriber."""
        self._directory.close()
        with self._lock:
            connections = list(self._connections.values())
            subscribers = list(self._subscribers.values())
            self._connections.clear()
            self._subscribers.clear()
            self._prefills.clear()
        for connection in connections:
            connection.close()
        for subscriber in subscribers:
            subscriber.close()

    def workers(self) -> dict[str, WorkerRecord]:
        """The eligible workers by id."""
        with self._lock:
            return self._workers_locked()

    def count_by_role(self) -> dict[Role, int]:
        counts = dict.fromkeys(ROUTED_ROLES, 0)
        for record in self.workers().values():
            counts[record.role] += 1
        return counts

    def in_flight(self) -> dict[str, tuple[Role, int]]:
        """``worker_id -> (role, in-flight requests)`` of every eligible worker."""
        with self._lock:
            return {
                worker_id: (record.role, self._load.get(worker_id, 0))
                for worker_id, record in self._workers_locked().items()
            }

    def subscriber(self, worker_id: str) -> KvEventSubscriber | None:
        with self._lock:
            return self._subscribers.get(worker_id)

    def submit(
        self,
        request_id: str,
        token_ids: list[int],
        *,
        max_tokens: int,
        sampling: dict[str, float | int | str | bool],
        deadline_ms: int,
        loop: asyncio.AbstractEventLoop,
    ) -> RoutedRequest:
        """Choose the workers, send the ``GenerateRequest`` and return the request in flight.

        Raises:
            ApiError: 503 when no decode or aggregated worker serves the model.
        """
        with self._lock:
            connection = self._choose_connection()
            prefill = None
            if connection.record.role is Role.DECODE:
                candidates = [
                    record
                    for record in self._prefills.values()
                    if record.compat_hash == connection.record.compat_hash
                ]
                prefill = choose_prefill(candidates, token_ids, self.index, self._load)
            request = GenerateRequest(
                request_id,
                token_ids,
                max_tokens,
                prefill.record.worker_id if prefill is not None else "",
                sampling,
                deadline_ms,
            )
            stream = ChunkStream(loop, self._max_chunks)
            routed = RoutedRequest(self, request, connection, prefill, stream)
            self._acquire(connection.worker_id)
            if prefill is not None:
                self._acquire(prefill.record.worker_id)
            connection.submit(request, stream)
        logger.debug(
            "%s -> decode %s, prefill %s (%s of %s blocks cached)",
            request_id,
            connection.worker_id,
            request.prefill_worker or "-",
            prefill.matched_blocks if prefill else 0,
            prefill.num_blocks if prefill else 0,
        )
        return routed

    # Internals (lock held where the name says so)
    # -----------------------------------------------------------------------------------------

    def _workers_locked(self) -> dict[str, WorkerRecord]:
        records = {wid: conn.record for wid, conn in self._connections.items()}
        records.update(self._prefills)
        return records

    def _choose_connection(self) -> WorkerConnection:
        record = choose_decode([c.record for c in self._connections.values()], self._load)
        if record is None:
            raise no_workers(
                f"no decode or aggregated worker serves {self.model_name!r} right now; start one "
                "(it registers in etcd) and retry"
            )
        return self._connections[record.worker_id]

    def _acquire(self, worker_id: str) -> None:
        self._load[worker_id] = self._load.get(worker_id, 0) + 1

    def _release(self, worker_id: str) -> None:
        with self._lock:
            count = self._load.get(worker_id, 0) - 1
            if count > 0:
                self._load[worker_id] = count
            else:
                self._load.pop(worker_id, None)

    def _eligible(self, record: WorkerRecord) -> bool:
        if record.role not in ROUTED_ROLES:
            return False
        model = record.layout.get("model")
        if model is None or model == self.model_name:
            return True
        if record.worker_id not in self._ignored:
            self._ignored.add(record.worker_id)
            logger.warning(
                "ignoring worker %s: it serves model %r, this frontend %r",
                record.worker_id,
                model,
                self.model_name,
            )
        return False

    def _on_change(self, event: WorkerEvent) -> None:
        """Directory callback (the watch's thread): apply one join, update or leave."""
        record = event.record
        worker_id = record.worker_id
        old = self.workers().get(worker_id)
        if event.kind is WorkerEventKind.UPDATED and old is not None and _same_peer(old, record):
            self._replace_record(record)
            return
        if old is not None:
            self._remove(worker_id, event.kind.value)
        if event.kind is not WorkerEventKind.LEFT and self._eligible(record):
            self._add(record)

    def _add(self, record: WorkerRecord) -> None:
        worker_id = record.worker_id
        if record.role in SERVING_ROLES:
            if "signal" not in record.endpoints:
                logger.warning("worker %s has no signal endpoint; ignored", worker_id)
                return
            connection = WorkerConnection(record, identity=self.identity)
            with self._lock:
                self._connections[worker_id] = connection
        else:
            subscriber = None
            events = record.endpoints.get("events")
            if events is not None:
                subscriber = KvEventSubscriber(
                    worker_id,
                    self.index,
                    endpoint=events,
                    replay_endpoint=record.endpoints.get("events_replay"),
                ).start()
            else:
                logger.warning(
                    "prefill worker %s publishes no KV events: routed by load", worker_id
                )
            with self._lock:
                self._prefills[worker_id] = record
                if subscriber is not None:
                    self._subscribers[worker_id] = subscriber
        logger.info("worker %s (%s) joined", worker_id, record.role.value)

    def _replace_record(self, record: WorkerRecord) -> None:
        with self._lock:
            connection = self._connections.get(record.worker_id)
            if connection is not None:
                connection.record = record
            elif record.worker_id in self._prefills:
                self._prefills[record.worker_id] = record

    def _remove(self, worker_id: str, why: str) -> None:
        with self._lock:
            connection = self._connections.pop(worker_id, None)
            subscriber = self._subscribers.pop(worker_id, None)
            self._prefills.pop(worker_id, None)
        if connection is not None:
            connection.close()
        if subscriber is not None:
            subscriber.close()
        self.index.clear_worker(worker_id)
        logger.info("worker %s removed (%s)", worker_id, why)


def _same_peer(old: WorkerRecord, new: WorkerRecord) -> bool:
    """True when ``new`` reaches the same running process the same way as ``old``."""
    return (
        old.role is new.role
        and old.endpoints == new.endpoints
        and old.compat_hash == new.compat_hash
        and old.started_at == new.started_at
        and old.layout.get("model") == new.layout.get("model")
    )
