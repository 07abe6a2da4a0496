"""``Fleet``: the live workers of one served model, their connections, KV events and load.

Owns, for one served model: a ``WorkerDirectory`` (joins, updates and leaves arrive from the
registry's watch, so no restart is needed), one connection per decode or aggregated worker
(a ``WorkerConnection`` over signals to the fabric's workers, an ``HttpConnection`` to a vLLM
instance: a record with a ``VllmLayout`` and an ``http`` endpoint), one
``KvEventSubscriber`` per worker of any role that publishes ``events``, the ``KvPrefixIndex``
they feed, and the in-flight count of every worker. It chooses nothing: the ``Router`` chooses
routes over it (``dispatch``), with ``policy``'s functions.

Membership::

    (absent) ──join, eligible──▶ LIVE ──update, same peer──▶ LIVE (record replaced)
                                   │
                                   ├──update, new peer (restart)──▶ leave, then join
                                   └──leave──▶ (absent: connection and subscriber closed,
                                                index entries forgotten)

Invariants:

* Eligible workers are the DECODE, AGGREGATED and PREFILL records whose ``layout.model`` is the
  served model name (records without one are accepted); others are ignored (logged once).
  A vLLM record without an ``http`` endpoint is ignored too: the frontend cannot send it requests.
  vLLM and fabric workers never share a route (their compat hashes differ).
* NODE_CACHE records (a host's node KV cache) are kept apart (``node_caches``): never routed
  to, never connected to. The KV events of one that publishes them (and names its ``node``)
  are followed into the index with the node cache's id as their location, and the fleet's view
  maps its node to it (``FleetView.node_caches``), so ``policy`` counts a node tier's prefix
  for the workers of that node with its compat hash and block size (its record's ``model`` is
  not compared: node caches name a model directory, workers a served name; one of another
  model has another compat hash and counts for no worker). A node cache that leaves or
  restarts is unsubscribed and its entries forgotten, as a worker's.
* A live DECODE or AGGREGATED worker has exactly one connection; a live PREFILL worker has none
  (it is only ever a KV source, reached by the serving worker).
* A record that changes its endpoints, compat hash or ``started_at`` (a restart) is treated as a
  leave then a join: its connection fails its open requests, its index entries are forgotten.
* A worker's in-flight count is the number of ``dispatch`` acquisitions not yet ``release``d
  (a worker with none has no entry); a release past zero is ignored, so a count never goes
  negative.
* A DRAINING worker (its record says ``draining``: it finishes what it holds, takes nothing
  new) stays live, with its connection, subscriber and index entries, so its open requests
  finish; no route choice sees it (``dispatch``'s view leaves it out), whatever its role.
* The ``Roster`` (the route choices' view) holds exactly the live eligible workers that are not
  draining, each serving one at its in-flight count, so a choice finds the least-loaded workers
  and a prompt's geometries without a pass over the fleet.
* One lock guards membership and load. ``dispatch`` holds it from the route choice until the
  request is handed to the connection and counted, and a leave unlinks a connection under it
  before closing it, so a request is never handed to a closed connection (it would wait for
  nothing). Subscriber threads write the index, which has its own lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registration import (
    ROUTER_GRACE_S,
    WorkerDirectory,
    WorkerEvent,
    WorkerEventKind,
)
from fabric.discovery.registry import DEFAULT_NAMESPACE, Registry, Role
from fabric.frontend.connection import ServingConnection, WorkerConnection
from fabric.frontend.http_backend import uses_http
from fabric.frontend.http_connection import HttpClients, HttpConnection
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.kv_subscriber import KvEventSubscriber
from fabric.frontend.policy import Route
from fabric.frontend.roster import SERVING_ROLES, Roster

logger = logging.getLogger(__name__)

ROUTED_ROLES = (Role.PREFILL, Role.DECODE, Role.AGGREGATED)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FleetView:
    """The fleet as one route choice sees it; valid only inside ``Fleet.dispatch``.

    Attributes:
        roster: the eligible workers, draining ones left out (``Roster``: by id, geometry,
            node, and the serving ones by load).
        load: ``worker_id -> in-flight requests`` (absent: none).
        index: which worker caches which prefix.
        node_caches: node name -> the node cache whose KV events the index follows.
        exclude: workers this choice must not pick (they refused the request).
    """

    roster: Roster
    load: Mapping[str, int]
    index: KvPrefixIndex
    node_caches: Mapping[str, WorkerRecord] = field(default_factory=dict)
    exclude: frozenset[str] = frozenset()

    @property
    def workers(self) -> Mapping[str, WorkerRecord]:
        """Every worker a route may name, by id (a copy only when some are excluded)."""
        records = self.roster.records
        if not self.exclude:
            return records
        return {w: r for w, r in records.items() if w not in self.exclude}

    def serving(self) -> list[WorkerRecord]:
        """The decode and aggregated workers a route may name (a pass over them)."""
        return [r for r in self.roster.serving() if r.worker_id not in self.exclude]


class Fleet:
    """The live workers of one model (see the module docstring). Thread-safe."""

    def __init__(
        self,
        registry: Registry,
        *,
        model_name: str,
        identity: str,
        namespace: str = DEFAULT_NAMESPACE,
        http: HttpClients | None = None,
    ) -> None:
        """Args:
        identity: this frontend's id: the signal client identity workers push chunks to.
        http: the HTTP clients of the connections to vLLM instances (default: new ones).
        """
        self.model_name = model_name
        self.identity = identity
        self.index = KvPrefixIndex()
        self._lock = threading.Lock()
        self._http = http or HttpClients()
        self._connections: dict[str, ServingConnection] = {}
        self._prefills: dict[str, WorkerRecord] = {}
        self._subscribers: dict[str, KvEventSubscriber] = {}
        self._load: dict[str, int] = {}
        self._roster = Roster()
        """The eligible workers that are not draining, indexed for route choices."""
        self._ignored: set[str] = set()
        self._node_caches: dict[str, WorkerRecord] = {}
        self._indexed_nodes: dict[str, WorkerRecord] = {}
        """node name -> its node cache, when the index follows that cache's events."""
        self._directory = WorkerDirectory(
            registry, namespace=namespace, on_change=self._on_change, grace_s=ROUTER_GRACE_S
        )

    def start(self) -> Fleet:
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
            self._roster = Roster()
        for connection in connections:
            connection.close()
        for subscriber in subscribers:
            subscriber.close()
        self._http.close()

    def workers(self) -> dict[str, WorkerRecord]:
        """The eligible workers by id."""
        with self._lock:
            return self._workers_locked()

    def count_by_role(self) -> dict[Role, int]:
        """Eligible workers that take new requests, by role: draining ones are not counted
        (``/health`` is unavailable when only draining decode workers are left)."""
        counts = dict.fromkeys(ROUTED_ROLES, 0)
        for record in self.workers().values():
            if not record.draining:
                counts[record.role] += 1
        return counts

    def node_caches(self) -> dict[str, WorkerRecord]:
        """The node caches registered in the namespace, by id (any model; display only)."""
        with self._lock:
            return dict(self._node_caches)

    def in_flight(self) -> dict[str, tuple[Role, int]]:
        """``worker_id -> (role, in-flight requests)`` of every eligible worker."""
        with self._lock:
            return {
                worker_id: (record.role, self._load.get(worker_id, 0))
                for worker_id, record in self._workers_locked().items()
            }

    def indexed_blocks(self) -> dict[str, int]:
        """``worker_id -> blocks the KV index knows it holds`` of every subscribed worker."""
        with self._lock:
            subscribed = list(self._subscribers)
        return {worker_id: self.index.num_blocks(worker_id) for worker_id in subscribed}

    def subscriber(self, worker_id: str) -> KvEventSubscriber | None:
        with self._lock:
            return self._subscribers.get(worker_id)

    def dispatch(
        self,
        choose: Callable[[FleetView], Route],
        send: Callable[[ServingConnection, Route], T],
        *,
        exclude: Collection[str] = (),
    ) -> T:
        """Choose a route and hand a request to its serving worker, as one step.

        Under the fleet's lock: ``choose`` picks a route from the live workers that are not
        draining and not in ``exclude`` (a worker that just refused the request), ``send`` hands
        the request to the route's serving connection (open until this returns), then the
        route's serving worker and KV source each count one more request in flight; the caller
        ``release``s each of them once.

        Returns:
            What ``send`` returned.

        Raises:
            Whatever ``choose`` or ``send`` raise; nothing is counted then.
        """
        with self._lock:
            view = FleetView(
                self._roster, self._load, self.index, self._indexed_nodes, frozenset(exclude)
            )
            route = choose(view)
            sent = send(self._connections[route.serving.worker_id], route)
            self._acquire_locked(route.serving.worker_id)
            if route.source is not None:
                self._acquire_locked(route.source.worker_id)
        return sent

    def release(self, worker_id: str) -> None:
        """One request fewer in flight on ``worker_id`` (ignored at zero)."""
        with self._lock:
            count = self._load.get(worker_id, 0) - 1
            if count > 0:
                self._load[worker_id] = count
            else:
                self._load.pop(worker_id, None)
            self._roster.set_load(worker_id, max(0, count))

    # Internals (lock held where the name says so)
    # -----------------------------------------------------------------------------------------

    def _workers_locked(self) -> dict[str, WorkerRecord]:
        records = {wid: conn.record for wid, conn in self._connections.items()}
        records.update(self._prefills)
        return records

    def _acquire_locked(self, worker_id: str) -> None:
        count = self._load[worker_id] = self._load.get(worker_id, 0) + 1
        self._roster.set_load(worker_id, count)

    def _eligible(self, record: WorkerRecord) -> bool:
        if record.role not in ROUTED_ROLES:
            return False
        model = record.layout.model
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
        if record.role is Role.NODE_CACHE:
            self._on_node_cache(event)
            return
        old = self.workers().get(worker_id)
        if event.kind is WorkerEventKind.UPDATED and old is not None and _same_peer(old, record):
            if record.draining and not old.draining:
                logger.info("worker %s (%s) draining", worker_id, record.role.value)
            self._replace_record(record)
            return
        if old is not None:
            self._remove(worker_id, event.kind.value)
        if event.kind is not WorkerEventKind.LEFT and self._eligible(record):
            self._add(record)

    def _on_node_cache(self, event: WorkerEvent) -> None:
        """A node cache joined, changed or left: keep its record, follow its KV events."""
        record = event.record
        worker_id = record.worker_id
        with self._lock:
            old = self._node_caches.pop(worker_id, None)
            if event.kind is not WorkerEventKind.LEFT:
                self._node_caches[worker_id] = record
        if old is not None and event.kind is not WorkerEventKind.LEFT and _same_peer(old, record):
            with self._lock:
                if old.node is not None and self._indexed_nodes.get(old.node) is old:
                    self._indexed_nodes[old.node] = record
            return
        if old is not None:
            self._unfollow_node_cache(old, event.kind.value)
        if event.kind is WorkerEventKind.LEFT or record.node is None:
            return
        subscriber = self._maybe_subscribe(record)
        if subscriber is None:
            return
        with self._lock:
            self._subscribers[worker_id] = subscriber
            self._indexed_nodes[record.node] = record
        logger.info("following the node tier of %s (node cache %s)", record.node, worker_id)

    def _unfollow_node_cache(self, record: WorkerRecord, why: str) -> None:
        with self._lock:
            subscriber = self._subscribers.pop(record.worker_id, None)
            if record.node is not None and self._indexed_nodes.get(record.node) is record:
                del self._indexed_nodes[record.node]
        if subscriber is not None:
            subscriber.close()
            self.index.clear_worker(record.worker_id)
            logger.info("node cache %s no longer followed (%s)", record.worker_id, why)

    def _add(self, record: WorkerRecord) -> None:
        worker_id = record.worker_id
        connection: ServingConnection | None = None
        if uses_http(record):
            if record.endpoints.http is None:
                logger.warning(
                    "%s worker %s (%s) has no http endpoint (kv_connector_extra_config "
                    "http_url); ignored",
                    record.role.value,
                    worker_id,
                    record.layout.engine.value,
                )
                return
            if record.role in SERVING_ROLES:
                connection = HttpConnection(record, self._http)
        elif record.role in SERVING_ROLES:
            if record.endpoints.signal is None:
                logger.warning("worker %s has no signal endpoint; ignored", worker_id)
                return
            connection = WorkerConnection(record, identity=self.identity)
        subscriber = self._maybe_subscribe(record)
        with self._lock:
            if connection is not None:
                self._connections[worker_id] = connection
            else:
                self._prefills[worker_id] = record
            if not record.draining:
                self._roster.put(record, self._load.get(worker_id, 0))
            if subscriber is not None:
                self._subscribers[worker_id] = subscriber
        logger.info("worker %s (%s) joined", worker_id, record.role.value)

    def _maybe_subscribe(self, record: WorkerRecord) -> KvEventSubscriber | None:
        """Follow the worker's KV events when it publishes them (any role)."""
        events = record.endpoints.events
        if events is not None:
            return KvEventSubscriber(
                record.worker_id,
                self.index,
                endpoint=events,
                replay_endpoint=record.endpoints.events_replay,
            ).start()
        if record.role is Role.NODE_CACHE:
            logger.info("node cache %s publishes no KV events: not routed to", record.worker_id)
        elif record.role is Role.PREFILL:
            logger.warning(
                "prefill worker %s publishes no KV events: routed by load", record.worker_id
            )
        else:
            logger.info(
                "%s worker %s publishes no KV events: its cache is unknown to the router",
                record.role.value,
                record.worker_id,
            )
        return None

    def _replace_record(self, record: WorkerRecord) -> None:
        with self._lock:
            connection = self._connections.get(record.worker_id)
            if connection is not None:
                connection.record = record
            elif record.worker_id in self._prefills:
                self._prefills[record.worker_id] = record
            else:
                return
            self._roster.discard(record.worker_id)
            if not record.draining:
                self._roster.put(record, self._load.get(record.worker_id, 0))

    def _remove(self, worker_id: str, why: str) -> None:
        with self._lock:
            connection = self._connections.pop(worker_id, None)
            subscriber = self._subscribers.pop(worker_id, None)
            self._prefills.pop(worker_id, None)
            self._roster.discard(worker_id)
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
        and old.layout.model == new.layout.model
    )
