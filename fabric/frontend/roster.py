"""``Roster``: the workers a route may choose, indexed so a choice costs the holders, not the fleet.

Owns, for the routable workers of a fleet (live, eligible, not draining): their records by id,
their ids by geometry (compat hash and block size: a prompt is hashed once per geometry), by node
(the workers a node tier's prefix counts for: those attached to their node's cache) and without
a geometry, and the serving workers (decode and aggregated) by in-flight load, so the
least-loaded ones are found in O(distinct loads) instead of a pass over every worker. ``Fleet``
keeps it under its lock; ``policy`` and the router read it inside ``Fleet.dispatch``.

Invariants:

* A worker is in ``records`` exactly when it is in one geometry group (or ``no_geometry``), in
  ``by_node`` when its record names a node and says it attached to its cache, and, when it
  serves, in one load bucket.
* A serving worker's bucket is its in-flight count (``set_load``); a bucket is never empty (it is
  deleted with its last worker). Not thread-safe: the owner locks.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import Role

Geometry = tuple[int, int]
"""(compat hash, block size): workers that hash a prompt alike and can exchange its blocks."""
SERVING_ROLES = (Role.DECODE, Role.AGGREGATED)


def geometry_of(record: WorkerRecord) -> Geometry | None:
    """The record's geometry; None without a block size."""
    block_size = record.layout.block_size
    return None if block_size is None else (record.compat_hash, block_size)


class Roster:
    """The routable workers, indexed (see the module docstring)."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.by_geometry: dict[Geometry, dict[str, None]] = {}
        self.no_geometry: dict[str, None] = {}
        self.by_node: dict[str, dict[str, None]] = {}
        self._load_of: dict[str, int] = {}
        """Serving workers only."""
        self._by_load: dict[int, dict[str, WorkerRecord]] = {}

    @classmethod
    def of(cls, records: Collection[WorkerRecord], load: dict[str, int] | None = None) -> Roster:
        """A roster of ``records`` (later ones replace earlier ones of the same id)."""
        roster = cls()
        for record in records:
            roster.put(record, (load or {}).get(record.worker_id, 0))
        return roster

    @property
    def num_serving(self) -> int:
        return len(self._load_of)

    def put(self, record: WorkerRecord, load: int = 0) -> None:
        """Add ``record`` (replacing the worker's previous one) with ``load`` in flight."""
        worker_id = record.worker_id
        self.discard(worker_id)
        self.records[worker_id] = record
        geometry = geometry_of(record)
        if geometry is None:
            self.no_geometry[worker_id] = None
        else:
            self.by_geometry.setdefault(geometry, {})[worker_id] = None
        if record.node is not None and record.node_cache:
            self.by_node.setdefault(record.node, {})[worker_id] = None
        if record.role in SERVING_ROLES:
            self._load_of[worker_id] = load
            self._by_load.setdefault(load, {})[worker_id] = record

    def discard(self, worker_id: str) -> None:
        """Remove the worker (nothing when absent)."""
        record = self.records.pop(worker_id, None)
        if record is None:
            return
        geometry = geometry_of(record)
        group = self.no_geometry if geometry is None else self.by_geometry[geometry]
        del group[worker_id]
        if geometry is not None and not group:
            del self.by_geometry[geometry]
        if record.node is not None and record.node_cache:
            members = self.by_node[record.node]
            del members[worker_id]
            if not members:
                del self.by_node[record.node]
        load = self._load_of.pop(worker_id, None)
        if load is not None:
            self._leave_bucket(worker_id, load)

    def set_load(self, worker_id: str, load: int) -> None:
        """A serving worker's in-flight count changed (ignored for other workers)."""
        old = self._load_of.get(worker_id)
        if old is None or old == load:
            return
        record = self.records[worker_id]
        self._leave_bucket(worker_id, old)
        self._load_of[worker_id] = load
        self._by_load.setdefault(load, {})[worker_id] = record

    def serving(self) -> Iterator[WorkerRecord]:
        """Every serving worker (a pass over them: for pins and error messages)."""
        for bucket in self._by_load.values():
            yield from bucket.values()

    def least_loaded(self, exclude: Collection[str] = ()) -> tuple[int, dict[str, WorkerRecord]]:
        """The least in-flight count among the serving workers not in ``exclude``, and those
        workers (a new dict only when ``exclude`` removes some); ``(0, {})`` when there are none.
        Costs the distinct loads (plus the bucket when ``exclude`` is given)."""
        for load in sorted(self._by_load):
            bucket = self._by_load[load]
            if exclude and not bucket.keys().isdisjoint(exclude):
                bucket = {w: r for w, r in bucket.items() if w not in exclude}
            if bucket:
                return load, bucket
        return 0, {}

    def _leave_bucket(self, worker_id: str, load: int) -> None:
        bucket = self._by_load[load]
        del bucket[worker_id]
        if not bucket:
            del self._by_load[load]
