"""Routing policy: which worker serves a request and which worker supplies its KV. Choices only.

Owns pure functions over worker records, loads and the KV prefix index; the fleet
(``fleet.Fleet``) owns the state they read, and the router (``router.Router``) resolves
per-request pins before calling them.

Prefixes (``cached_prefixes``): for every worker, how many leading full blocks of the prompt it
holds on the device or host tier (``ROUTABLE_TIERS``). The disk tiers are left out: the shared disk
tier needs no routing (every worker finds its disk hits itself), so a disk copy never makes one
worker a better KV source than another. The prompt's sequence hashes are computed the way workers
register blocks, ``sequence_hashes(tokens, layout.block_size, seed=record.compat_hash)`` (a
``KvBlockManager``'s compat hash is its hash seed), once per distinct (seed, block size), lazily:
in chunks (``sequence_hash_chunks``: ``HASH_CHUNK_BLOCKS`` first, each next one
``HASH_CHUNK_GROWTH`` times larger), looked up a chunk at a time (``KvPrefixIndex.match_chunks``)
and only as far as the index walks, which stops at the first block none of the group's workers
holds. So a prompt costs hashing up to a few times its longest cached prefix, and nothing for a
group none of whose workers has an indexed block.

Node tiers (``fabric.node``): a node cache's KV events are indexed with the node cache as their
location (its record's id; ``Fleet`` follows them), and a worker whose record names the node
(``WorkerRecord.node``) of a node cache of its geometry (compat hash and block size) counts the
node tier's prefix as its own: its prefix is ``max(own pools, node tier)``, since its admission
finds node-tier blocks right after its own pools (one copy out of the shared segment). A node
hit is weighed as a device or host hit (the policy weighs tiers alike: a node hit costs one
memcpy, a host hit one too), so a prefix in node N's tier makes every instance of node N a
holder, and the least-loaded of them serves it without a peer transfer. Only workers whose
record says they attached to their node's cache (``WorkerRecord.node_cache``, set by
``--node-cache``) are credited: one on the node that did not attach cannot find those blocks.

The policy, in order:

1. **Serving worker** (``choose_serving``): the decode or aggregated worker with the fewest
   in-flight requests; among equally loaded ones, the aggregated worker holding the longest
   cached prefix of the prompt (a decode worker's own prefix does not count here: it keeps the
   id order, as before); then the smallest worker id, so choices are reproducible. Load comes
   first on purpose: a worker lacking the prefix reads it from a holder (step 2) instead of
   recomputing it, so sending every request that shares a prefix to its one holder would buy a
   transfer's worth of time at the price of a hot spot. The router takes the least-loaded
   workers from the fleet's ``Roster`` (its lowest load bucket) and breaks the tie with
   ``choose_among_tied``, the same choice without a pass over the fleet.
2. **KV source** (``choose_source``, ``GenerateRequest.prefill_worker``): candidates are the
   other workers the serving worker can read KV from (``SOURCE_ROLES``: prefill and aggregated
   workers) with its compat hash and
   block size. A *holder* is a candidate holding at least ``MIN_PEER_GAIN_BLOCKS`` more leading
   blocks of the prompt than the serving worker itself. A decode worker picks among all its
   candidates (disaggregated serving: a prefill worker computes what it lacks), an aggregated
   worker among the holders only. The pick: the longest cached prefix, then a dedicated prefill
   worker before an aggregated one (computing prompts is its job), then the fewest in-flight
   requests, then the smallest id. No pick: the serving worker computes the prompt itself, using
   its own cached prefix.
3. **Route kind** (``route_kind``): ``local`` without a KV source; ``prefill`` when a decode
   worker reads from a dedicated prefill worker (disaggregated serving, as before); ``peer_hit``
   for every other source (an aggregated holder, or a prefill worker holding the prefix an
   aggregated worker lacks); ``node`` for a route without a source whose serving worker's
   prefix is longer in its node's tier than in its own pools (it reads the node cache).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import Role
from fabric.frontend.holders import TIER_BITS, HeldPrefixes, slots_of
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.roster import Geometry, Roster, geometry_of
from fabric.kvbm import Tier
from fabric.kvbm.core.hashing import sequence_hash_chunks

SOURCE_ROLES: Mapping[Role, tuple[Role, ...]] = {
    Role.DECODE: (Role.PREFILL, Role.AGGREGATED),
    Role.AGGREGATED: (Role.PREFILL, Role.AGGREGATED),
}
"""Serving role -> the roles whose workers it can read a prompt's KV from (both serve
``PrefillRequest``s: ``fabric.pd.KV_SOURCE_ROLES``)."""
ROUTABLE_TIERS = frozenset({Tier.DEVICE, Tier.HOST, Tier.NODE})
"""Tiers whose copies route: a worker's device and host pools, and node caches' tiers (only node
caches publish ``Tier.NODE`` events)."""
MIN_PEER_GAIN_BLOCKS = 1
HASH_CHUNK_BLOCKS = 16
"""Blocks of the first chunk a prompt is hashed in."""
HASH_CHUNK_GROWTH = 4
"""How many times larger each next chunk is: a 2048-block prompt is five lookups, and hashing
goes at most a few chunks' worth past the longest cached prefix."""


class RouteKind(Enum):
    """Where a request's prompt KV comes from (see the module docstring, step 3)."""

    LOCAL = "local"
    PREFILL = "prefill"
    PEER_HIT = "peer_hit"
    NODE = "node"


@dataclass(frozen=True, slots=True)
class Prefix:
    """How many of the prompt's ``num_blocks`` full blocks a worker holds (``matched``): in its
    own pools or in its node's tier, whichever holds more (``from_node``: the node's tier)."""

    matched: int
    num_blocks: int
    from_node: bool = False


NO_PREFIX = Prefix(0, 0)


@dataclass(frozen=True, slots=True)
class Route:
    """The workers of one request and the prefixes the router saw when it chose them.

    Attributes:
        source: the worker whose KV the serving worker reads (``prefill_worker``); None: the
            serving worker computes the prompt itself.
        source_blocks: full prompt blocks the KV provider holds: the source's, or the serving
            worker's own for a local route.
        local_blocks: full prompt blocks the serving worker holds itself.
        pinned: the request named its serving worker or its KV source (``fabric`` field).
    """

    serving: WorkerRecord
    source: WorkerRecord | None
    kind: RouteKind
    source_blocks: int
    local_blocks: int
    num_blocks: int
    pinned: bool = False


def compatible(a: WorkerRecord, b: WorkerRecord) -> bool:
    """Whether ``a`` and ``b`` can exchange KV blocks: same compat hash and block size."""
    return a.compat_hash == b.compat_hash and a.layout.block_size == b.layout.block_size


class Prefixes(Mapping[str, Prefix]):
    """Every routable worker's cached prefix of one prompt, read from the index walks' results
    on demand (``cached_prefixes``; one walk per geometry): a lookup costs the number of
    distinct prefix lengths, and ``longest`` and ``holders`` the workers the walks name, so a
    decision over a large fleet reads only the workers it looks at.

    A worker counts its node's tier (module docstring) when ``node_caches`` has a node cache of
    its geometry for its node; the walk of that geometry then includes the node cache's
    location. A walk's groups name workers of its own geometry only (a worker's events name
    hashes of its seed and block size, which no other geometry's prompt hashes equal), so
    ``longest`` and ``holders`` need not check the geometry of the workers they name."""

    def __init__(self, roster: Roster, node_caches: Mapping[str, WorkerRecord]) -> None:
        self._roster = roster
        self._node_caches = node_caches
        self._cache_at = {cache.worker_id: cache for cache in node_caches.values()}
        self._walks: dict[Geometry, tuple[HeldPrefixes, int]] = {}
        """geometry -> its walk and the prompt's full blocks at its block size."""

    def add(self, geometry: Geometry, walk: HeldPrefixes, num_blocks: int) -> None:
        """The walk of ``geometry``'s workers (and of its node caches' locations)."""
        self._walks[geometry] = (walk, num_blocks)

    def __getitem__(self, worker_id: str) -> Prefix:
        record = self._roster.records[worker_id]
        geometry = geometry_of(record)
        entry = None if geometry is None else self._walks.get(geometry)
        if entry is None or not entry[1]:
            return NO_PREFIX if entry is None or not entry[1] else Prefix(0, entry[1])
        walk, num_blocks = entry
        own = walk.length_of(worker_id)
        location = self._node_location(record)
        node = 0 if location is None else walk.length_of(location)
        return Prefix(max(own, node), num_blocks, node > own)

    def __iter__(self) -> Iterator[str]:
        return iter(self._roster.records)

    def __len__(self) -> int:
        return len(self._roster.records)

    def longest(self, tied: Collection[str], accept: Callable[[str], bool]) -> set[str]:
        """Those of ``tied`` that ``accept`` holding the longest prefix among them (empty: none
        holds any): the walks' groups, longest first, until one names such a worker. A group
        costs its holders or, when it has more than ``tied``, one mask of ``tied`` per walk."""
        best_length, best = 0, set()
        for walk, _ in self._walks.values():
            locations = self._location_bits(walk)
            tied_bits: int | None = None
            for length, bits in reversed(walk.groups):  # the groups grow in length
                if length < best_length:
                    break
                found = {w for w in self._node_members(walk, bits & locations) if w in tied}
                own = bits & ~locations
                if own.bit_count() > len(tied):
                    if tied_bits is None:
                        slot_of = walk.slot_of
                        tied_bits = sum(
                            1 << (slot * TIER_BITS)
                            for w in tied
                            if (slot := slot_of.get(w)) is not None
                        )
                    own &= tied_bits
                found.update(w for w in _named(walk, own) if w in tied)
                found = {w for w in found if accept(w)}
                if found:
                    if length > best_length:
                        best_length, best = length, found
                    else:
                        best |= found
                    break
        return best

    def holders(self, min_blocks: int) -> Iterator[str]:
        """The routable workers holding at least ``min_blocks`` (> 0) leading blocks (in their
        own pools or their node's tier; a worker holding both ways may come twice)."""
        records = self._roster.records
        for walk, _ in self._walks.values():
            locations = self._location_bits(walk)
            for length, bits in walk.groups:
                if length >= min_blocks:
                    yield from (w for w in _named(walk, bits & ~locations) if w in records)
                    yield from self._node_members(walk, bits & locations)

    def _location_bits(self, walk: HeldPrefixes) -> int:
        """The mask bits of the node caches' locations in ``walk`` (the rest are workers)."""
        bits = 0
        for location in self._cache_at:
            slot = walk.slot_of.get(location)
            if slot is not None:
                bits |= 1 << (slot * TIER_BITS)
        return bits

    def _node_members(self, walk: HeldPrefixes, bits: int) -> Iterator[str]:
        """The routable workers whose node tier a location of ``bits`` (of ``walk``) is: the
        workers of its node, of the node cache's geometry."""
        records = self._roster.records
        for location in _named(walk, bits):
            cache = self._cache_at[location]
            if cache.node is not None:
                for worker_id in self._roster.by_node.get(cache.node, ()):
                    if compatible(records[worker_id], cache):
                        yield worker_id

    def _node_location(self, record: WorkerRecord) -> str | None:
        """The index location of ``record``'s node tier, when one of its geometry is followed."""
        if record.node is None or not record.node_cache:
            return None
        cache = self._node_caches.get(record.node)
        return cache.worker_id if cache is not None and compatible(cache, record) else None


def _named(walk: HeldPrefixes, bits: int) -> Iterator[str]:
    """The ids ``walk`` names for the slot bits ``bits``."""
    for slot in slots_of(bits):
        worker_id = walk.worker_of[slot]
        assert worker_id is not None, "a walked slot has a worker"
        yield worker_id


def cached_prefixes(
    records: Collection[WorkerRecord] | Roster,
    token_ids: Sequence[int],
    index: KvPrefixIndex,
    node_caches: Mapping[str, WorkerRecord] | None = None,
) -> Prefixes:
    """Each worker's cached prefix of the prompt on ``ROUTABLE_TIERS`` (no geometry: none).

    Costs one walk per geometry (and the isdisjoint check of its ids against the index's): the
    fleet's ``Roster`` keeps the workers grouped, a collection is grouped here.

    Args:
        node_caches: node name -> the node cache whose events the index follows (its record's
            id is their location); a worker of that node and geometry counts its prefix too.
    """
    roster = records if isinstance(records, Roster) else Roster.of(records)
    node_caches = node_caches or {}
    prefixes = Prefixes(roster, node_caches)
    locations: dict[Geometry, list[str]] = {}
    for cache in node_caches.values():
        geometry = geometry_of(cache)
        if geometry is not None and geometry in roster.by_geometry:
            locations.setdefault(geometry, []).append(cache.worker_id)
    for geometry, worker_ids in roster.by_geometry.items():
        seed, block_size = geometry
        chunks = sequence_hash_chunks(
            token_ids,
            block_size,
            seed=seed,
            first_blocks=HASH_CHUNK_BLOCKS,
            growth=HASH_CHUNK_GROWTH,
        )
        walked: Collection[str] = worker_ids.keys()
        if geometry in locations:
            walked = {*worker_ids, *locations[geometry]}
        walk = index.held_prefixes(chunks, walked, ROUTABLE_TIERS)
        prefixes.add(geometry, walk, len(token_ids) // block_size)
    return prefixes


def choose_serving(
    candidates: Sequence[WorkerRecord],
    load: Mapping[str, int],
    prefixes: Mapping[str, Prefix] | None = None,
) -> WorkerRecord | None:
    """The least-loaded candidate; ties: an aggregated worker's longer prefix, then the id."""
    if not candidates:
        return None
    loads = [load.get(record.worker_id, 0) for record in candidates]
    least = min(loads)
    tied = {r.worker_id: r for r, n in zip(candidates, loads, strict=True) if n == least}
    return choose_among_tied(tied, prefixes or {})


def choose_among_tied(
    tied: Mapping[str, WorkerRecord], prefixes: Mapping[str, Prefix]
) -> WorkerRecord:
    """``choose_serving``'s tie-break over equally loaded workers (not empty): the aggregated
    worker holding the longest prefix, then the smallest id. Over ``Prefixes`` it costs the
    holders (and the smallest id, a pass over the ids in C), not a lookup per tied worker."""
    if len(tied) == 1:
        return next(iter(tied.values()))
    if isinstance(prefixes, Prefixes):

        def aggregated(worker_id: str) -> bool:
            return tied[worker_id].role is Role.AGGREGATED

        longest = prefixes.longest(tied.keys(), aggregated)
        return tied[min(longest or tied)]

    def key(record: WorkerRecord) -> tuple[int, str]:
        own = prefixes.get(record.worker_id, NO_PREFIX).matched
        return (-own if record.role is Role.AGGREGATED else 0, record.worker_id)

    return min(tied.values(), key=key)


def choose_source(
    serving: WorkerRecord,
    candidates: Sequence[WorkerRecord],
    load: Mapping[str, int],
    prefixes: Mapping[str, Prefix],
    *,
    min_gain_blocks: int = MIN_PEER_GAIN_BLOCKS,
) -> WorkerRecord | None:
    """The worker ``serving`` should read the prompt's KV from, or None (compute locally).

    Args:
        candidates: any workers; those of another role, geometry or compat hash, and
            ``serving`` itself, are skipped.
        min_gain_blocks: how many more leading blocks than ``serving`` a holder must hold.
    """
    roles = SOURCE_ROLES.get(serving.role, ())
    wanted = prefixes.get(serving.worker_id, NO_PREFIX).matched + min_gain_blocks
    reads_prefill = serving.role is Role.DECODE
    pool: list[tuple[int, WorkerRecord]] = []
    for record in candidates:  # the cheap test first: most workers hold no longer prefix
        matched = prefixes.get(record.worker_id, NO_PREFIX).matched
        if (matched >= wanted or (reads_prefill and record.role is Role.PREFILL)) and (
            record.worker_id != serving.worker_id
            and record.role in roles
            and compatible(record, serving)
        ):
            pool.append((matched, record))
    if not pool:
        return None

    def key(entry: tuple[int, WorkerRecord]) -> tuple[int, bool, int, str]:
        matched, record = entry
        dedicated = record.role is Role.PREFILL
        return (-matched, not dedicated, load.get(record.worker_id, 0), record.worker_id)

    return min(pool, key=key)[1]


def route_kind(
    serving: WorkerRecord, source: WorkerRecord | None, *, from_node: bool = False
) -> RouteKind:
    """The kind of a route (module docstring, step 3); ``from_node``: the serving worker's
    prefix is in its node's tier."""
    if source is None:
        return RouteKind.NODE if from_node else RouteKind.LOCAL
    if serving.role is Role.DECODE and source.role is Role.PREFILL:
        return RouteKind.PREFILL
    return RouteKind.PEER_HIT


def make_route(
    serving: WorkerRecord,
    source: WorkerRecord | None,
    prefixes: Mapping[str, Prefix],
    *,
    pinned: bool = False,
) -> Route:
    """The ``Route`` of a chosen (or pinned) pair, with the prefixes the router saw."""
    local = prefixes.get(serving.worker_id, NO_PREFIX)
    provider = prefixes.get(source.worker_id, NO_PREFIX) if source is not None else local
    return Route(
        serving=serving,
        source=source,
        kind=route_kind(serving, source, from_node=local.from_node),
        source_blocks=provider.matched,
        local_blocks=local.matched,
        num_blocks=provider.num_blocks or local.num_blocks,
        pinned=pinned,
    )
