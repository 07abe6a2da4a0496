"""``Router``: resolves a request's pins and chooses its route over a ``Fleet``, then submits it.

Owns the routing of one request: the router resolves a request's ``RoutePin`` (the ``fabric``
field of the body) against the fleet's live workers and refuses a pin it cannot honour with a 400
naming the live workers; ``policy`` makes every choice a pin leaves open; the fleet hands the
``GenerateRequest`` to the serving worker's connection. It owns the ``Fleet`` it is given (closing
the router closes it) and holds no state of its own but the stream bound and the load cap.

Invariants:

* A route's serving worker is a live decode or aggregated worker; its KV source, when there is
  one, is another live worker the serving worker can read KV from (``SOURCE_ROLES``, same compat
  hash and block size), so vLLM and fabric workers never share a route.
* A ``RoutedRequest`` holds one in-flight count on each of its route's workers: the serving
  worker until the request ends, a KV source (``prefill_worker``) until the first chunk (its
  prefill or offer is done then). Its releases are idempotent, so each count is released exactly
  once.
* Choosing, sending and counting are one ``Fleet.dispatch``: a request is never handed to a
  connection after the connection was closed. Draining workers are never chosen (the fleet's
  view leaves them out).
* A request a draining worker refused before starting it (a ``StreamFailure`` marked
  ``refused``: the frontend had not yet seen the record's ``draining``) is routed again over the
  workers that have not refused it, on the same stream, its slots moved to the new route
  (``RoutedRequest.next_item``). When the others are all at their cap (``AllWorkersBusy``), it
  waits for room through ``requeue`` (the frontend's admission queue, as any request at cap: a
  429 with ``Retry-After`` only when that queue is full or its timeout passes); when no other
  worker can take it at all, the refusal is its end.
* With a cap (``max_in_flight_per_worker``), a serving worker with that many requests in flight
  (the fleet's count: this frontend's requests) gets no more; a request none can take raises
  ``AllWorkersBusy`` (``admission`` waits and retries), checked before any prefix is hashed.
  KV sources are not capped: each request they serve holds a capped serving worker's count too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import Role
from fabric.errors import FabricError
from fabric.frontend.connection import ChunkStream, ServingConnection, StreamFailure, StreamItem
from fabric.frontend.errors import ApiError, Refusal, bad_request, no_workers
from fabric.frontend.fleet import Fleet, FleetView
from fabric.frontend.policy import (
    MIN_PEER_GAIN_BLOCKS,
    NO_PREFIX,
    SOURCE_ROLES,
    Prefixes,
    Route,
    cached_prefixes,
    choose_among_tied,
    choose_serving,
    choose_source,
    compatible,
    make_route,
)
from fabric.frontend.roster import SERVING_ROLES
from fabric.signal.messages import GenerateRequest

logger = logging.getLogger(__name__)

_QUEUE_REFUSALS = (Refusal.QUEUE_FULL, Refusal.NO_ROOM)
_KV_SOURCE_ROLES = tuple(dict.fromkeys(role for roles in SOURCE_ROLES.values() for role in roles))


class AllWorkersBusy(FabricError):
    """Every serving worker the request could use has its cap of requests in flight."""


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


_Sent = tuple[GenerateRequest, ServingConnection, Route]
_Resend = Callable[[Collection[str]], _Sent]
"""Route the request again, leaving out the given worker ids, and send it (``Router.submit``)."""
Requeue = Callable[[Callable[[], _Sent]], Awaitable[_Sent]]
"""Wait for room: retry the attempt until it stops raising ``AllWorkersBusy`` (the frontend's
admission queue); raises ``ApiError`` (429 with ``Retry-After``) when the queue refuses."""


class RoutedRequest:
    """One request in flight on its chosen workers; ``next_item`` yields the worker's chunks."""

    def __init__(
        self,
        fleet: Fleet,
        sent: _Sent,
        stream: ChunkStream,
        *,
        resend: _Resend | None = None,
        requeue: Requeue | None = None,
    ) -> None:
        self.request, self._connection, self.route = sent
        self.stream = stream
        self._fleet = fleet
        self._resend = resend
        self._requeue = requeue
        self._refused_by: set[str] = set()
        self._holds_source = self.route.source is not None
        self._holds_serving = True

    async def next_item(self, timeout_s: float) -> StreamItem | None:
        """The stream's next chunk or failure, None when none came within ``timeout_s``.

        A refusal by a draining worker sends the request to another worker (module docstring),
        waiting in ``requeue`` while every other one is at its cap, and waits for that one's
        first item; the refusal is returned when none can take it.

        Raises:
            ApiError: ``requeue`` refused the request (429: its queue is full or no worker had
                room in time); the request holds no slot then.
        """
        item = await self.stream.get(timeout_s)
        while isinstance(item, StreamFailure) and item.refused and await self._route_again(item):
            item = await self.stream.get(timeout_s)
        return item

    async def _route_again(self, refusal: StreamFailure) -> bool:
        """Move the request to a worker that has not refused it; False when there is none."""
        if self._resend is None:
            return False
        refused_by = self.serving.worker_id
        self._refused_by.add(refused_by)
        self.finish()
        resend = self._resend
        refused = frozenset(self._refused_by)
        try:
            try:
                self.request, self._connection, self.route = resend(refused)
            except AllWorkersBusy:
                if self._requeue is None:
                    raise
                logger.info(
                    "request %s refused by draining %s; every other worker is at its cap: queued",
                    self.request.request_id,
                    refused_by,
                )
                self.request, self._connection, self.route = await self._requeue(
                    lambda: resend(refused)
                )
        except (ApiError, AllWorkersBusy) as exc:
            if isinstance(exc, ApiError) and exc.refusal in _QUEUE_REFUSALS:
                raise  # the queue's own answer (429 with Retry-After), as for any request
            logger.info(
                "request %s refused by draining %s and no other worker can take it: %s",
                self.request.request_id,
                refused_by,
                exc,
            )
            return False
        self._holds_source = self.route.source is not None
        self._holds_serving = True
        logger.info(
            "request %s refused by %s (%s); routed to %s",
            self.request.request_id,
            refused_by,
            refusal.message,
            self.serving.worker_id,
        )
        return True

    @property
    def serving(self) -> WorkerRecord:
        """The worker that generates the answer (decode or aggregated)."""
        return self.route.serving

    def prefill_done(self) -> None:
        """Release the KV source's in-flight slot (idempotent)."""
        if self._holds_source and self.route.source is not None:
            self._holds_source = False
            self._fleet.release(self.route.source.worker_id)

    def finish(self) -> None:
        """Release every slot this request holds (idempotent)."""
        self.prefill_done()
        if self._holds_serving:
            self._holds_serving = False
            self._fleet.release(self.serving.worker_id)

    def abort(self, reason: str) -> None:
        """Tell the worker to stop (``Abort``) and release the slots."""
        self._connection.abort(self.request.request_id, reason)
        self.finish()


class Router:
    """Routes requests over one ``Fleet`` (see the module docstring)."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        max_chunks: int = 4096,
        max_in_flight_per_worker: int | None = None,
    ) -> None:
        """Args:
        fleet: the live workers to route over; the router owns it from now on.
        max_chunks: chunks a request's stream may hold before its reader is declared too slow.
        max_in_flight_per_worker: the cap of a serving worker's requests in flight (None: none).
        """
        self.fleet = fleet
        self._max_chunks = max_chunks
        self._max_in_flight = max_in_flight_per_worker

    def start(self) -> Router:
        """Start the fleet (existing workers arrive as joins)."""
        self.fleet.start()
        return self

    def close(self) -> None:
        """Close the fleet: every connection (open requests fail) and subscriber."""
        self.fleet.close()

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
        requeue: Requeue | None = None,
    ) -> RoutedRequest:
        """Choose the workers, send the ``GenerateRequest`` and return the request in flight.

        Raises:
            ApiError: 503 when no decode or aggregated worker serves the model; 400 when ``pin``
                names a worker that is not live, has the wrong role or cannot exchange KV with
                the other one.
            AllWorkersBusy: every serving worker the request could use is at its cap.

        Args:
            requeue: where a request a draining worker refused waits while every other worker
                is at its cap (``RoutedRequest.next_item``); None: the refusal is its end.
        """
        resolved = pin or RoutePin()
        stream = ChunkStream(loop, self._max_chunks)

        def choose(view: FleetView) -> Route:
            return self.choose(view, token_ids, resolved)

        def send(connection: ServingConnection, route: Route) -> _Sent:
            source = route.source
            request = GenerateRequest(
                request_id,
                token_ids,
                max_tokens,
                source.worker_id if source is not None else "",
                sampling,
                deadline_ms,
            )
            connection.submit(request, stream, source)
            return request, connection, route

        def resend(exclude: Collection[str]) -> _Sent:
            return self.fleet.dispatch(choose, send, exclude=exclude)

        routed = RoutedRequest(
            self.fleet, self.fleet.dispatch(choose, send), stream, resend=resend, requeue=requeue
        )
        route = routed.route
        logger.debug(
            "%s -> %s, KV from %s (%s%s; %d of %d blocks cached there, %d here)",
            request_id,
            routed.serving.worker_id,
            routed.request.prefill_worker or "itself",
            route.kind.value,
            ", pinned" if route.pinned else "",
            route.source_blocks,
            route.num_blocks,
            route.local_blocks,
        )
        return routed

    def choose(
        self, view: FleetView, token_ids: Sequence[int], pin: RoutePin | None = None
    ) -> Route:
        """The route of one request over ``view``: ``pin`` honoured, the rest chosen by
        ``policy``. Sends nothing and counts nothing (``submit`` does, through ``dispatch``).

        Raises:
            ApiError, AllWorkersBusy: as ``submit``.
        """
        pin = pin or RoutePin()
        workers = view.workers
        least, tied = view.roster.least_loaded(view.exclude)
        if not tied:
            raise no_workers(
                f"no decode or aggregated worker serves {self.fleet.model_name!r} right now; "
                "start one (it registers in etcd) and retry"
            )
        serving = None
        serving_pool: list[WorkerRecord] | None = None
        if pin.worker is not None:
            serving = _pinned(workers, pin.worker, SERVING_ROLES, "worker")
            self._check_room([serving], view.load)
        source = None
        if pin.prefill_worker:
            source = _pinned(workers, pin.prefill_worker, _KV_SOURCE_ROLES, "prefill_worker")
        if serving is None and source is not None:
            serving_pool = [
                r
                for r in view.serving()
                if r.worker_id != source.worker_id
                and source.role in SOURCE_ROLES.get(r.role, ())
                and compatible(r, source)
            ]
            if not serving_pool:
                raise bad_request(
                    f"fabric.prefill_worker: no decode or aggregated worker other than "
                    f"{source.worker_id!r} can read its KV ({source.role.value}, "
                    f"{_geometry(source)}); live decode or aggregated workers: "
                    + _live(workers, SERVING_ROLES),
                    "fabric.prefill_worker",
                )
            serving_pool = self._check_room(serving_pool, view.load)
        elif serving is None and self._max_in_flight is not None and least >= self._max_in_flight:
            self._check_room(view.serving(), view.load)  # raises, naming them
        prefixes = cached_prefixes(view.roster, token_ids, view.index, view.node_caches)
        if serving is None:
            if serving_pool is None:  # the least loaded, found without a pass over the fleet
                serving = choose_among_tied(tied, prefixes)
            else:
                serving = choose_serving(serving_pool, view.load, prefixes)
            assert serving is not None, "the pool has a worker with room"
        if source is not None:
            _check_source(serving, source)
        elif pin.prefill_worker is None:
            source = choose_source(
                serving, _source_candidates(serving, workers, prefixes), view.load, prefixes
            )
        pinned = pin.worker is not None or pin.prefill_worker is not None
        return make_route(serving, source, prefixes, pinned=pinned)

    def _check_room(
        self, candidates: list[WorkerRecord], load: Mapping[str, int]
    ) -> list[WorkerRecord]:
        """The candidates below the cap; ``AllWorkersBusy`` when none is."""
        cap = self._max_in_flight
        if cap is None:
            return candidates
        with_room = [r for r in candidates if load.get(r.worker_id, 0) < cap]
        if not with_room:
            names = ", ".join(r.worker_id for r in candidates)
            raise AllWorkersBusy(
                f"every serving worker this request can use ({names}) has {cap} requests in "
                "flight (--max-in-flight-per-worker)"
            )
        return with_room


def _source_candidates(
    serving: WorkerRecord, workers: Mapping[str, WorkerRecord], prefixes: Prefixes
) -> list[WorkerRecord]:
    """The workers ``choose_source`` must look at: every one for a decode worker (it may read
    from a prefill worker holding nothing), else only those holding more than the serving
    worker (``MIN_PEER_GAIN_BLOCKS`` more): O(holders), not O(fleet)."""
    if serving.role is Role.DECODE:
        return list(workers.values())
    wanted = prefixes.get(serving.worker_id, NO_PREFIX).matched + MIN_PEER_GAIN_BLOCKS
    return [workers[w] for w in dict.fromkeys(prefixes.holders(wanted)) if w in workers]


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
