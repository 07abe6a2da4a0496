"""The node cache's slot index in shared memory: readers find and copy committed blocks without a
round trip to the service, and check afterwards that what they copied was not overwritten.

One writer, the service (``IndexWriter``, under ``NodeCache``'s lock), many readers
(``IndexReader``, one per attached client), one POSIX shared-memory file beside the data segment
(``/dev/shm/<segment>-index``), laid out as ``uint64`` words::

    header   magic, version, num_slots, num_buckets, the data segment's inode, closed, 0, 0
    gen      [num_slots]    per slot: even = published (its bytes are the block of slot_hash),
                            odd = not (free, reserved for a writer, or never written)
    hash     [num_slots]    the sequence hash of the block a published slot holds
    touched  [num_slots]    readers set 1 on the slots they read (recency); the writer drains it
    buckets  [num_buckets]  open addressing, linear probing from ``home_bucket(hash)``:
                            slot + 1, 0 empty; deletion shifts entries back (no tombstones)

Slot lifecycle, as the index sees it (a slot's generation only grows)::

    odd ──publish (commit registered its block; its bytes are written)──▶ even
     ▲                                                                     │
     └──── unpublish (handed to a writer by ``allocate``: reserve, promote) ┘

The reader's protocol is a seqlock per slot: read the generations of the probed slots (even),
check each slot's hash, copy the bytes, read the generations again; a block whose generation did
not change was not handed to any writer during the copy, since the service unpublishes a slot
before a writer learns of it (the reply to a reservation follows the bump, and a writer writes
only after that reply). So a reader holds nothing: a reader killed mid-copy leaks nothing, and
a copy raced by an eviction is detected and cut, never served. The buckets only find candidates:
a probe that meets an entry being moved by a deletion may miss (a false miss, which readers send
to the service's lookup), never find a wrong block (each candidate's hash and generation are
checked).

Ordering: the reader relies on loads not being reordered with older loads (x86-64's TSO: the
second read of a generation cannot see an older value than the copied bytes came after), so
``IndexReader`` is only built on x86-64 (elsewhere clients keep the lookup + pin path).

Invariants: a published slot's bytes are the committed block of its hash; a slot is unpublished
before any writer is told it may write there; the writer sets ``closed`` before it unlinks the
file, and a reader uses an index only while its path still names the file it mapped.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fabric.errors import StorageError
from fabric.kvbm import BlockId, BlockPool, BlockState

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
MAGIC = 0x3158444E49464B56  # b"VKFINDX1" little-endian
VERSION = 1
_HEADER_WORDS = 8
_MAGIC, _VERSION, _NUM_SLOTS, _NUM_BUCKETS, _DATA_INODE, _CLOSED = range(6)
OPTIMISTIC_READS = platform.machine() in ("x86_64", "AMD64")
"""Whether this machine's memory order lets readers check a copy with a second load (see the
module docstring)."""


def index_name(segment: str) -> str:
    """The index file's name beside the data segment ``segment``."""
    return f"{segment}-index"


def index_path(segment: str) -> str:
    return os.path.join(SHM_DIR, index_name(segment))


def segment_inode(segment: str) -> int | None:
    """The inode of the data segment ``segment`` now (None: there is none)."""
    try:
        return os.stat(os.path.join(SHM_DIR, segment)).st_ino
    except FileNotFoundError:
        return None


_MIX = 0x9E3779B97F4A7C15
"""Fibonacci hashing: a bucket is the top bits of ``hash * _MIX`` (mod 2**64), so hashes that
differ only in their high bits (or count up) do not cluster in linear probing."""


def home_bucket(sequence_hash: int, num_buckets: int) -> int:
    """The bucket probing for ``sequence_hash`` starts at (``num_buckets`` a power of two)."""
    shift = 64 - (num_buckets.bit_length() - 1)
    return ((int(sequence_hash) * _MIX) & 0xFFFFFFFFFFFFFFFF) >> shift


def _home_buckets(hashes: np.ndarray, num_buckets: int) -> np.ndarray:
    """``home_bucket`` of each of ``hashes`` (uint64), vectorised."""
    shift = np.uint64(64 - (num_buckets.bit_length() - 1))
    return ((hashes * np.uint64(_MIX)) >> shift).astype(np.int64)


def _num_buckets(num_slots: int) -> int:
    return 1 << max(4, (2 * num_slots - 1).bit_length())  # load factor at most 1/2


class _Mapping:
    """The file's words as numpy views (``header``, ``gen``, ``hash``, ``touched``,
    ``buckets``)."""

    def __init__(self, fd: int, num_bytes: int) -> None:
        self.fd = fd
        self.inode = os.fstat(fd).st_ino
        self._mmap = mmap.mmap(fd, num_bytes)
        words = np.frombuffer(self._mmap, dtype=np.uint64)
        self.header = words[:_HEADER_WORDS]
        num_slots, num_buckets = int(self.header[_NUM_SLOTS]), int(self.header[_NUM_BUCKETS])
        at = _HEADER_WORDS
        self.gen = words[at : at + num_slots]
        self.hash = words[at + num_slots : at + 2 * num_slots]
        self.touched = words[at + 2 * num_slots : at + 3 * num_slots]
        self.buckets = words[at + 3 * num_slots : at + 3 * num_slots + num_buckets].view(np.int64)
        self.mask = num_buckets - 1

    def close(self) -> None:
        for name in ("header", "gen", "hash", "touched", "buckets"):
            setattr(self, name, None)
        with contextlib.suppress(BufferError):
            self._mmap.close()
        os.close(self.fd)


def _file_bytes(num_slots: int) -> int:
    return 8 * (_HEADER_WORDS + 3 * num_slots + _num_buckets(num_slots))


class IndexWriter:
    """The service's side: publish committed slots, unpublish slots handed to writers, drain
    readers' touches. Not thread-safe (``NodeCache`` calls it under its lock)."""

    def __init__(self, segment: str, num_slots: int, data_inode: int) -> None:
        self.path = index_path(segment)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a killed service (the caller holds the segment's claim)
        num_bytes = _file_bytes(num_slots)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, num_bytes)
            header = np.zeros(_HEADER_WORDS, dtype=np.uint64)
            header[[_MAGIC, _VERSION, _NUM_SLOTS, _NUM_BUCKETS, _DATA_INODE]] = [
                MAGIC,
                VERSION,
                num_slots,
                _num_buckets(num_slots),
                data_inode,
            ]
            os.pwrite(fd, header.tobytes(), 0)
            self._map = _Mapping(fd, num_bytes)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._map.gen[:] = 1  # nothing published
        self._closed = False

    def publish(self, slots: Sequence[int], hashes: Sequence[int]) -> None:
        """Slots whose committed bytes now hold ``hashes`` (each slot currently unpublished)."""
        m = self._map
        for slot, h in zip(slots, hashes, strict=True):
            assert m.gen[slot] & 1, f"slot {slot} published twice"
            m.hash[slot] = h
            m.gen[slot] += 1
            b = home_bucket(h, m.mask + 1)
            while m.buckets[b]:
                b = (b + 1) & m.mask
            m.buckets[b] = slot + 1

    def publish_registered(
        self, pool: BlockPool, slots: Sequence[int], hashes: Sequence[int]
    ) -> None:
        """``publish`` the slots ``pool`` registered (``slots[i]`` under ``hashes[i]``); a slot
        whose hash was already registered elsewhere (a duplicate) went back to the free list
        and stays unpublished."""
        kept = [i for i, s in enumerate(slots) if pool.state(BlockId(s)) is BlockState.REGISTERED]
        self.publish([slots[i] for i in kept], [hashes[i] for i in kept])

    def unpublish(self, slots: Sequence[int]) -> None:
        """Slots about to be handed to a writer: readers that copied them see the change."""
        m = self._map
        for slot in slots:
            if m.gen[slot] & 1:
                continue
            m.gen[slot] += 1
            self._remove(slot)

    def drain_touched(self) -> tuple[list[int], list[int]]:
        """The published slots readers marked since the last drain, and their hashes."""
        m = self._map
        slots = np.flatnonzero(m.touched)
        if not slots.size:
            return [], []
        m.touched[slots] = 0
        slots = slots[(m.gen[slots] & 1) == 0]
        return slots.tolist(), m.hash[slots].tolist()

    def close(self) -> None:
        """Mark the index closed (readers stop using it) and unlink it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._map.header[_CLOSED] = 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._map.close()

    def _remove(self, slot: int) -> None:
        m = self._map
        b = home_bucket(int(m.hash[slot]), m.mask + 1)
        while m.buckets[b] != slot + 1:
            if not m.buckets[b]:
                return  # never inserted (cannot happen for a published slot)
            b = (b + 1) & m.mask
        hole = b
        j = b
        while True:  # backward-shift deletion: keep every entry reachable from its home
            j = (j + 1) & m.mask
            entry = int(m.buckets[j])
            if not entry:
                break
            home = home_bucket(int(m.hash[entry - 1]), m.mask + 1)
            if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
                continue  # its home lies after the hole: it stays
            m.buckets[hole] = entry
            hole = j
        m.buckets[hole] = 0


@dataclass(frozen=True, slots=True)
class Probe:
    """The leading hashes a probe found: their slots and the generations read before the copy."""

    slots: np.ndarray
    gens: np.ndarray


class IndexReader:
    """A client's side (see the module docstring). Owned by one thread, like its client."""

    def __init__(self, segment: str, num_slots: int) -> None:
        self.path = index_path(segment)
        fd = os.open(self.path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != _file_bytes(num_slots):
                raise StorageError(f"{self.path} holds {size} bytes, not an index of {num_slots}")
            self._map = _Mapping(fd, size)
        except BaseException:
            os.close(fd)
            raise
        header = self._map.header
        if int(header[_MAGIC]) != MAGIC or int(header[_VERSION]) != VERSION:
            self._map.close()
            raise StorageError(f"{self.path} is not a version {VERSION} node cache index")
        self.data_inode = int(header[_DATA_INODE])

    def current(self) -> bool:
        """Whether the service that wrote this index still serves it (not closed, not
        replaced by a restarted service)."""
        if self._map.header[_CLOSED]:
            return False
        try:
            return os.stat(self.path).st_ino == self._map.inode
        except FileNotFoundError:
            return False

    def probe(self, sequence_hashes: Sequence[int]) -> Probe:
        """The longest prefix of ``sequence_hashes`` published now (vectorised probing)."""
        m = self._map
        wanted = np.fromiter(sequence_hashes, dtype=np.uint64, count=len(sequence_hashes))
        found = np.full(wanted.size, -1, dtype=np.int64)
        home = _home_buckets(wanted, m.mask + 1)
        pending = np.arange(wanted.size)
        for step in range(m.mask + 1):
            entries = m.buckets[(home[pending] + step) & m.mask]
            empty = entries == 0
            slots = entries - 1
            hit = ~empty & (m.hash[np.where(empty, 0, slots)] == wanted[pending])
            found[pending[hit]] = slots[hit]
            pending = pending[~empty & ~hit]
            if not pending.size:
                break
        misses = np.flatnonzero(found < 0)
        slots = found[: misses[0]] if misses.size else found
        gens = m.gen[slots]
        published = np.flatnonzero(gens & np.uint64(1))
        end = published[0] if published.size else slots.size
        # the hash is re-checked after the generation read: a slot republished between the
        # bucket probe and this read under another hash is not ours
        same = np.flatnonzero(m.hash[slots[:end]] != wanted[:end])
        end = same[0] if same.size else end
        return Probe(slots[:end], gens[:end].copy())

    def num_unchanged(self, probe: Probe, num_blocks: int) -> int:
        """How many leading blocks of ``probe[:num_blocks]`` kept their generation (read after
        the copy): those bytes are the blocks probed."""
        changed = np.flatnonzero(self._map.gen[probe.slots[:num_blocks]] != probe.gens[:num_blocks])
        return int(changed[0]) if changed.size else num_blocks

    def touch(self, slots: np.ndarray) -> None:
        """Mark slots read (the service refreshes their recency)."""
        self._map.touched[slots] = 1

    def close(self) -> None:
        self._map.close()


def open_index(segment: str, num_slots: int, data_inode: int | None) -> IndexReader | None:
    """The index of ``segment`` for a client that mapped the data segment of inode
    ``data_inode`` (None: it changed while being mapped); None when optimistic reads are off
    here, the service publishes no index, or it belongs to another data segment (a service
    restarting meanwhile): that client then loads through lookup + pin."""
    if not OPTIMISTIC_READS:
        return None
    try:
        reader = IndexReader(segment, num_slots)
    except (OSError, StorageError) as exc:
        logger.info(
            "node cache index of %s not used (%s): loads go through the service", segment, exc
        )
        return None
    if reader.data_inode != data_inode:
        reader.close()
        logger.info("node cache index of %s belongs to another segment: not used", segment)
        return None
    return reader
