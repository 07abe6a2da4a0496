"""``Router``: live workers from discovery, their signal connections and KV events; routing.

Owns, for one served model: a ``WorkerDirectory`` (joins, updates and leaves arrive from the
registry's watch, so no restart is needed), one connection per decode or aggregated worker
(a ``WorkerConnection`` over signals to the fabric's workers, an ``HttpConnection`` to a vLLM
instance: a record with a ``VllmLayout`` and an ``http`` endpoint), one
``KvEventSubscriber`` per worker of any role that publishes ``events``, the ``KvPrefixIndex``
they feed, and the in-flight count of every worker. The choices themselves are
``policy``'s; the router resolves a request's ``RoutePin`` (the ``fabric`` field of the body)
against the live workers and refuses a pin it cannot honour with a 400 naming the live workers.

Invariants:

* Eligible workers are the DECODE, AGGREGATED and PREFILL records whose ``layout.model`` is the
  served model name (records without one are accepted); others are ignored (logged once).
  A vLLM record without an ``http`` endpoint is ignored too: the frontend cannot send it requests.
  vLLM and fabric workers never share a route (their compat hashes differ).
* A record that changes its endpoints, compat hash or ``started_at`` (a restart) is treated as a
  leave then a join: its connection fails its open requests, its index entries are forgotten.
* The in-flight count of a worker is the number of ``RoutedRequest``s holding it: a serving worker
  until the request ends, a KV source (``prefill_worker``) until the first chunk (its prefill or
  offer is done then). ``RoutedRequest`` releases are idempotent, so a count never goes negative.
* ``submit`` and the directory callback take one lock, so a request is never handed to a
  connection after the connection was closed (it would wait for nothing).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registration import WorkerDirectory, WorkerEvent, WorkerEventKind
from fabric.discovery.registry import DEFAULT_NAMESPACE, Registry, Role
from fabric.frontend.connection import ChunkStream, ServingConnection, WorkerConnection
from fabric.frontend.errors import bad_request, no_workers
from fabric.frontend.http_backend import uses_http
from fabric.frontend.http_connection import HttpClients, HttpConnection
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.kv_subscriber import KvEventSubscriber
from fabric.frontend.policy import (
    SERVING_ROLES,
    SOURCE_ROLES,
    Route,
    cached_prefixes,
    choose_serving,
    choose_source,
    compatible,
    make_route,
)
from fabric.signal.messages import GenerateRequest

logger = logging.getLogger(__name__)

ROUTED_ROLES = (Role.PREFILL, Role.DECODE, Role.AGGREGATED)
_KV_SOURCE_ROLES = tuple(dict.fromkeys(role for roles in SOURCE_ROLES.values() for role in roles))


@dataclass(frozen=True, slots=True)
class RoutePin:
    """A request's routing overrides (the body's ``fabric`` object); None: automatic.

    Attributes:
        worker: the serving (decode or aggregated) worker's id.
        prefill_worker: the KV source's id (a prefill or aggregated worker); "" forces the
            serving worker to compute the prompt itself.
    """

    worker: str | None = None
    prefill_worker: str | None = None


class RoutedRequest:
    """One request in flight on its chosen workers; ``stream`` yields the worker's chunks."""

    def __init__(
        self,
        router: Router,
        request: GenerateRequest,
        connection: ServingConnection,
        route: Route,
        stream: ChunkStream,
    ) -> None:
        self.request = request
        self.route = route
        self.stream = stream
        self._router = router
        self._connection = connection
        self._holds_source = route.source is not None
        self._holds_serving = True

    @property
    def serving(self) -> WorkerRecord:
        """The worker that generates the answer (decode or aggregated)."""
        return self.route.serving

    def prefill_done(self) -> None:
        """Release the KV source's in-flight slot (idempotent)."""
        if self._holds_source and self.route.source is not None:
            self._holds_source = False
            self._router._release(self.route.source.worker_id)

    def finish(self) -> None:
        """Release every slot this request holds (idempotent)."""
        self.prefill_done()
        if self._holds_serving:
            self._holds_serving = False
            self._router._release(self.serving.worker_id)

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
        http: HttpClients | None = None,
    ) -> None:
        """Args:
        identity: this frontend's id: the signal client identity workers push chunks to.
        max_chunks: chunks a request's stream may hold before its reader is declared too slow.
        http: the HTTP clients of the connections to vLLM instances (default: new ones).
        """
        self.model_name = model_name
        self.identity = identity
        self.index = KvPrefixIndex()
        self._max_chunks = max_chunks
        self._lock = threading.Lock()
        self._http = http or HttpClients()
        self._connections: dict[str, ServingConnection] = {}
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
        self._http.close()

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
        pin: RoutePin | None = None,
    ) -> RoutedRequest:
        """Choose the workers, send the ``GenerateRequest`` and return the request in flight.

        Raises:
            ApiError: 503 when no decode or aggregated worker serves the model; 400 when ``pin``
                names a worker that is not live, has the wrong role or cannot exchange KV with
                the other one.
        """
        with self._lock:
            route = self._route_locked(token_ids, pin or RoutePin())
            connection = self._connections[route.serving.worker_id]
            source = route.source
            request = GenerateRequest(
                request_id,
                token_ids,
                max_tokens,
                source.worker_id if source is not None else "",
                sampling,
                deadline_ms,
            )
            stream = ChunkStream(loop, self._max_chunks)
            routed = RoutedRequest(self, request, connection, route, stream)
            self._acquire(connection.worker_id)
            if source is not None:
                self._acquire(source.worker_id)
            connection.submit(request, stream, source)
        logger.debug(
            "%s -> %s, KV from %s (%s%s; %d of %d blocks cached there, %d here)",
            request_id,
            connection.worker_id,
            request.prefill_worker or "itself",
            route.kind.value,
            ", pinned" if route.pinned else "",
            route.source_blocks,
            route.num_blocks,
            route.local_blocks,
        )
        return routed

    # Internals (lock held where the name says so)
    # -----------------------------------------------------------------------------------------

    def _workers_locked(self) -> dict[str, WorkerRecord]:
        records = {wid: conn.record for wid, conn in self._connections.items()}
        records.update(self._prefills)
        return records

    def _route_locked(self, token_ids: list[int], pin: RoutePin) -> Route:
        workers = self._workers_locked()
        serving_pool = [connection.record for connection in self._connections.values()]
        if not serving_pool:
            raise no_workers(
                f"no decode or aggregated worker serves {self.model_name!r} right now; start one "
                "(it registers in etcd) and retry"
            )
        serving = None
        if pin.worker is not None:
            serving = _pinned(workers, pin.worker, SERVING_ROLES, "worker")
        source = None
        if pin.prefill_worker:
            source = _pinned(workers, pin.prefill_worker, _KV_SOURCE_ROLES, "prefill_worker")
        prefixes = cached_prefixes(list(workers.values()), token_ids, self.index)
        if serving is None:
            if source is not None:
                serving_pool = [
                    r
                    for r in serving_pool
                    if r.worker_id != source.worker_id
                    and source.role in SOURCE_ROLES.get(r.role, ())
                    and compatible(r, source)
                ]
            serving = choose_serving(serving_pool, self._load, prefixes)
            if serving is None:
                assert source is not None, "only a pinned source empties the serving pool"
                raise bad_request(
                    f"fabric.prefill_worker: no decode or aggregated worker other than "
                    f"{source.worker_id!r} can read its KV ({source.role.value}, "
                    f"{_geometry(source)}); live decode or aggregated workers: "
                    + _live(workers, SERVING_ROLES),
                    "fabric.prefill_worker",
                )
        if source is not None:
            _check_source(serving, source)
        elif pin.prefill_worker is None:
            source = choose_source(serving, list(workers.values()), self._load, prefixes)
        pinned = pin.worker is not None or pin.prefill_worker is not None
        return make_route(serving, source, prefixes, pinned=pinned)

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
        if record.role is Role.PREFILL:
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
        and old.layout.model == new.layout.model
    )


def _live(workers: Mapping[str, WorkerRecord], roles: Collection[Role]) -> str:
    """The ids of the live workers of ``roles``, for an error message."""
    ids = sorted(wid for wid, record in workers.items() if record.role in roles)
    return ", ".join(ids) if ids else "none"


def _a(role: Role) -> str:
    """``role`` with its article: "a prefill", "an aggregated"."""
    return f"{'an' if role.value[0] in 'aeiou' else 'a'} {role.value}"


def _geometry(record: WorkerRecord) -> str:
    return f"compat hash {record.compat_hash:#x}, block size {record.layout.block_size}"


def _pinned(
    workers: Mapping[str, WorkerRecord], worker_id: str, roles: Collection[Role], field: str
) -> WorkerRecord:
    """The live worker a pin names, or a 400 naming the live workers of ``roles``."""
    wanted = " or ".join(role.value for role in roles)
    record = workers.get(worker_id)
    if record is None:
        problem = f"no live worker is called {worker_id!r}"
    elif record.role not in roles:
        problem = f"{worker_id!r} is {_a(record.role)} worker, not {wanted}"
    else:
        return record
    raise bad_request(
        f"fabric.{field}: {problem}; live {wanted} workers: {_live(workers, roles)}",
        f"fabric.{field}",
    )


def _check_source(serving: WorkerRecord, source: WorkerRecord) -> None:
    """Refuse (400) a pinned KV source the serving worker cannot read."""
    problem = None
    if source.worker_id == serving.worker_id:
        problem = f'{source.worker_id!r} is the serving worker itself; give "" to compute locally'
    elif source.role not in (roles := SOURCE_ROLES.get(serving.role, ())):
        readable = " or ".join(role.value for role in roles)
        problem = (
            f"{source.worker_id!r} is {_a(source.role)} worker; the serving worker "
            f"{serving.worker_id!r} ({serving.role.value}) reads KV from {readable} workers only"
        )
    elif not compatible(serving, source):
        problem = (
            f"{source.worker_id!r} ({_geometry(source)}) and the serving worker "
            f"{serving.worker_id!r} ({_geometry(serving)}) cannot exchange KV"
        )
    if problem is not None:
        raise bad_request(f"fabric.prefill_worker: {problem}", "fabric.prefill_worker")
