"""The shared disk tier: a content-addressed, persistent block store on a shared directory.

``SharedBlockStore`` keeps one file per block in a directory that several worker processes
(and, over a network filesystem, several hosts) share. A file is named by its block's sequence
hash, so every instance that computes the same hash finds the bytes another one wrote, and the
cache survives a restart (``rescan``, which the constructor runs, rebuilds the index from the
files). The files' layout, header and verification are ``format``'s; instances sharing a compat
hash must share ``block_bytes``: a file of another payload length reads as corrupt.

Invariants:

* A file under a block's name is complete. A writer fills a uniquely named temp file in the same
  fan-out directory (``fsync`` optional), stamps its mtime and ``os.replace``-s it into place, so
  two writers of one hash race harmlessly (same bytes; the last rename wins). A failed write
  leaves no temp file; ``rescan`` removes temp files of crashed writers once they are older than
  ``STALE_TEMP_SECONDS`` (hosts sharing a directory need clocks closer than that).
* A read serves a block only if ``format`` verifies the whole file. Anything else is a miss; a
  corrupt file is removed (WARNING, ``stats.corrupt``), never served. A reader racing another
  process's eviction (unlink) reads the whole file or finds none: a miss, never garbage. After a
  miss the bytes in ``out`` are unspecified.
* The index is an ``LruPolicy`` over sequence hashes, guarded by one lock: a touch (hit, skipped
  or finished write, adoption) removes and re-inserts a hash, so ``evict`` picks the least
  recently touched. Reads and writes of payloads happen outside the lock; evictions (including
  a rescan's) unlink under it, and a write's "already there" check (a ``stat``) and the indexing
  that follows happen under it too, so a block is never indexed after this instance unlinked
  its file. After each call the index holds at most ``capacity_blocks`` hashes; indexing one
  more unlinks the least recently used file. Recency lives in the file mtime too: a hit or a
  skipped write stamps it (``os.utime``), so it survives restarts and other instances see it;
  ``rescan`` inserts in mtime order.
* Capacity bounds what *this* instance indexes. Instances sharing a directory should use the same
  capacity; when one evicts a block another still indexes, the other simply misses on it later.
  The directory can hold one extra file per concurrent writer between a write and its eviction.
* ``contains`` and ``prefix_length`` read no file: they trust the index, and for a hash not
  indexed they ``stat`` the file and adopt a block of the right size another instance wrote
  (``stats.adopted``). So a present block can still miss on read (evicted by another instance
  since, or corrupt); the read drops it from the index and the caller onboards a shorter prefix.
* Thread-safe: the owner thread and copy threads may call every method concurrently.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from fabric.errors import ConfigError, StorageError
from fabric.kvbm.core.eviction import LruPolicy
from fabric.kvbm.core.types import SequenceHash
from fabric.kvbm.shared.file_io import (
    NO_ACCESS,
    NO_SPACE,
    byte_view,
    create_exclusive,
    fsync_directory,
    pwritev_all,
    rows_view,
    touch,
    unlink_quietly,
)
from fabric.kvbm.shared.format import (
    U64_MAX,
    BlockFormat,
    ReadOutcome,
    block_path,
    checked_hash,
    compat_directory,
    fanout_directories,
    hash_from_name,
    is_temp_name,
    temp_path,
)
from fabric.kvbm.tiers.block_copy import gather_to_staging
from fabric.kvbm.tiers.storage import Storage

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BlockBuffer: TypeAlias = "np.ndarray | torch.Tensor | bytes | bytearray | memoryview"
"""A C-contiguous buffer of one block's bytes (a torch tensor must be on the CPU)."""

STALE_TEMP_SECONDS = 60.0
"""``rescan`` removes temp files older than this: writers that crashed mid-write left them."""

_PRIORITY = (0,)  # the index is LRU and ignores priorities; the protocol wants one per key


@dataclass(slots=True)
class SharedStoreStats:
    """Counters since the store was opened.

    ``misses`` counts every read that returned False, corrupt ones included; ``corrupt`` counts
    files removed as corrupt (by reads and by ``rescan``); ``evicted`` counts LRU unlinks;
    ``adopted`` counts blocks indexed after another process wrote them (found by ``contains``,
    ``prefix_length``, ``write`` or a read). ``contains`` and ``prefix_length`` count no hits.
    """

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    written: int = 0
    skipped: int = 0
    evicted: int = 0
    adopted: int = 0


@dataclass(frozen=True, slots=True)
class _Scan:
    num_indexed: int
    num_corrupt: int
    num_stale_temps: int
    num_evicted: int


class SharedBlockStore:
    """Blocks of one compat hash under ``root``, at most ``capacity_blocks`` indexed, LRU evicted.

    Thread-safe; several processes (and hosts) may open stores on the same ``root``.

    Args:
        root: the shared directory; created (with parents) if missing.
        compat_hash: u64 that changes whenever KV bytes become incompatible (model, dtype, layout).
        block_bytes: the payload size of every block.
        capacity_blocks: how many blocks this instance indexes before evicting.
        fsync: fsync each block file and its directory before a write returns (durable across
            power loss; much slower).
        key: a MAC key (``load_mac_key``): every file written carries a keyed MAC and only
            files with a valid one are served (``fabric.kvbm.shared.format``); None trusts
            everyone who can write the directory.
    """

    def __init__(
        self,
        root: Path,
        *,
        compat_hash: int,
        block_bytes: int,
        capacity_blocks: int,
        fsync: bool = False,
        key: bytes | None = None,
    ) -> None:
        _check_config(compat_hash, block_bytes, capacity_blocks)
        self._root = Path(root)
        self._format = BlockFormat(compat_hash, block_bytes, key)
        self._capacity = capacity_blocks
        self._fsync = fsync
        self._dir = _open_directory(compat_directory(self._root, compat_hash, key))
        self._dir_str = os.fspath(self._dir)
        self._tmp_tag = secrets.token_hex(4)
        self._tmp_counter = itertools.count()
        self._lock = threading.RLock()
        self._index: LruPolicy[SequenceHash] = LruPolicy()
        self._last_stamp = 0
        self._closed = False
        self.stats = SharedStoreStats()
        scan = self._scan()
        logger.info(
            "disk store %s: %d blocks indexed (capacity %d of %d bytes); removed %d corrupt "
            "files, %d stale temp files, %d blocks over capacity",
            self._dir,
            scan.num_indexed,
            capacity_blocks,
            block_bytes,
            scan.num_corrupt,
            scan.num_stale_temps,
            scan.num_evicted,
        )

    @property
    def root(self) -> Path:
        return self._root

    @property
    def compat_hash(self) -> int:
        return self._format.compat_hash

    @property
    def block_bytes(self) -> int:
        return self._format.block_bytes

    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __repr__(self) -> str:
        return (
            f"SharedBlockStore({self._dir_str!r}, blocks={len(self)}/{self._capacity}, "
            f"block_bytes={self._format.block_bytes})"
        )

    def block_path(self, h: SequenceHash) -> Path:
        """Where block ``h`` lives (whether or not it is there)."""
        return Path(self._locate(h)[1])

    # ---- queries ---------------------------------------------------------------------------

    def contains(self, h: SequenceHash) -> bool:
        """True if ``h`` is indexed, or its file exists (then it is adopted into the index)."""
        self._check_open()
        key, path = self._locate(h)
        with self._lock:
            if key in self._index:
                return True
        if not self._format.has_file(path):
            return False
        self._index_recent(key, adopted=True)
        return True

    def prefix_length(self, hashes: Sequence[SequenceHash]) -> int:
        """How many leading ``hashes`` are present, stopping at the first miss; reads no payload.

        Blocks another instance wrote are adopted on the way, so a prefix longer than
        ``capacity_blocks`` evicts its own first blocks: keep capacity above the longest onboard.
        """
        self._check_open()
        keys = [self._locate(h)[0] for h in hashes]
        num_indexed = 0
        with self._lock:
            for key in keys:
                if key not in self._index:
                    break
                num_indexed += 1
        num_present = num_indexed
        for key in keys[num_indexed:]:
            if not self.contains(key):
                break
            num_present += 1
        return num_present

    # ---- writes ----------------------------------------------------------------------------

    def write(self, h: SequenceHash, payload: BlockBuffer) -> bool:
        """Store block ``h`` unless it is present; atomic (temp file + rename).

        Returns:
            True if written, False if already present (skipped; its recency is refreshed).

        Raises:
            InvalidInput: ``payload`` is not a C-contiguous buffer of ``block_bytes`` bytes.
            StorageError: the file could not be written (no space, no permission, ...); no temp
                file is left behind and the block is not indexed.
        """
        self._check_open()
        data = byte_view(payload, self._format.block_bytes, "payload", writable=False)
        key, path = self._locate(h)
        with self._lock:  # decided and indexed atomically: an eviction unlinks under this lock
            indexed = key in self._index
            stamp = self._next_stamp_locked()
            # Present: indexed and still on disk (stamping it proves that), or written by
            # another instance. An indexed file another instance evicted is written again.
            if (indexed and touch(path, stamp)) or self._format.has_file(path):
                self.stats.skipped += 1
                self._index_recent(key, adopted=not indexed, path=None if indexed else path)
                return False
        self._write_file(key, path, data, stamp)
        with self._lock:
            self.stats.written += 1
        self._index_recent(key, adopted=False)
        return True

    def write_many(self, items: Iterable[tuple[SequenceHash, BlockBuffer]]) -> int:
        """``write`` each (hash, payload) in order; returns how many were written (not skipped)."""
        return sum(self.write(h, payload) for h, payload in items)

    # ---- reads -----------------------------------------------------------------------------

    def read_into(self, h: SequenceHash, out: np.ndarray) -> bool:
        """Read block ``h`` into ``out`` (writable, C-contiguous, ``block_bytes`` bytes).

        Returns:
            True on a hit (``out`` holds the verified block; recency refreshed). False on a miss:
            absent, truncated, too long, another format, compat or sequence hash, or a checksum
            mismatch (such a file is removed). After a miss ``out`` holds unspecified bytes.
        """
        self._check_open()
        view = byte_view(out, self._format.block_bytes, "out", writable=True)
        return self._read_one(h, view)

    def read_many(self, hashes: Sequence[SequenceHash], out: np.ndarray) -> int:
        """Read ``hashes[i]`` into row ``i`` of ``out`` (``[>= len(hashes), block_bytes]`` bytes).

        Reads in order and stops at the first miss. Returns how many leading rows hold blocks.
        """
        self._check_open()
        num = len(hashes)
        bb = self._format.block_bytes
        rows = rows_view(out, num, bb)
        for i, h in enumerate(hashes):
            if not self._read_one(h, rows[i * bb : (i + 1) * bb]):
                return i
        return num

    # ---- removal and maintenance -----------------------------------------------------------

    def remove(self, h: SequenceHash) -> bool:
        """Drop block ``h`` from the index and the directory; True if it was indexed or on disk."""
        self._check_open()
        key, path = self._locate(h)
        with self._lock:
            indexed = key in self._index
            self._index.remove((key,))
        try:
            os.unlink(path)
        except FileNotFoundError:
            return indexed
        except OSError as e:
            raise StorageError(
                f"removing {path} failed: {e.strerror}; check the permissions under {self._root}"
            ) from e
        return True

    def rescan(self) -> int:
        """Rebuild the index from the directory; returns how many blocks are indexed.

        Reads headers only (magic, version, checksums of the header, compat and sequence hash,
        length and file size; not the payload checksum, which reads check). Files that fail are
        removed as corrupt; temp files older than ``STALE_TEMP_SECONDS`` are removed; LRU order
        comes from file mtimes; the oldest blocks beyond ``capacity_blocks`` are evicted.
        """
        self._check_open()
        scan = self._scan()
        logger.debug(
            "rescanned %s: %d blocks, %d corrupt, %d stale temp files, %d evicted",
            self._dir,
            scan.num_indexed,
            scan.num_corrupt,
            scan.num_stale_temps,
            scan.num_evicted,
        )
        return scan.num_indexed

    def close(self) -> None:
        """Forget the index (the files stay for the next open). Idempotent."""
        self._closed = True
        with self._lock:
            self._index.clear()

    # ---- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"disk store {self._dir} is closed; open a new SharedBlockStore")

    def _locate(self, h: SequenceHash) -> tuple[SequenceHash, str]:
        """The checked hash and its file path."""
        key = checked_hash(h)
        return key, block_path(self._dir_str, key)

    def _next_stamp_locked(self) -> int:
        """A wall-clock ns timestamp, strictly increasing within this store (recency order)."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _index_recent(self, key: SequenceHash, *, adopted: bool, path: str | None = None) -> None:
        """Make ``key`` the most recently used entry (adding it if new) and evict over capacity.

        With ``path``, also stamp the file's mtime.
        """
        with self._lock:
            index = self._index
            known = key in index
            if known:
                index.remove((key,))  # a touch: re-inserted below as the most recently used
            index.insert((key,), _PRIORITY)
            if not known:
                self.stats.adopted += adopted
                self._evict_over_capacity_locked()
            stamp = self._next_stamp_locked()
        if path is not None:
            touch(path, stamp)

    def _evict_over_capacity_locked(self) -> int:
        """Evict the least recently used hashes beyond capacity; returns how many.

        Their files are unlinked before the caller lets the lock go, so no ``write`` can see a
        victim's file, skip, and index a block whose file then disappears.
        """
        victims = self._index.evict(max(0, len(self._index) - self._capacity))
        self.stats.evicted += len(victims)
        self._unlink_victims(victims)
        return len(victims)

    def _unlink_victims(self, victims: list[SequenceHash]) -> None:
        if not victims:
            return
        for victim in victims:
            path = self._locate(victim)[1]
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another instance evicted it first
            except OSError as e:
                logger.warning("evicting %s failed (%s); the file stays unindexed", path, e)
        logger.debug("evicted %d LRU blocks from %s", len(victims), self._dir)

    def _read_one(self, h: SequenceHash, view: memoryview) -> bool:
        key, path = self._locate(h)
        outcome, why = self._format.read(path, key, view)
        if outcome is ReadOutcome.HIT:
            with self._lock:
                self.stats.hits += 1
            self._index_recent(key, adopted=True, path=path)
            return True
        with self._lock:
            self.stats.misses += 1
            self._index.remove((key,))
            if outcome is ReadOutcome.CORRUPT:
                self.stats.corrupt += 1
        if outcome is ReadOutcome.CORRUPT:
            logger.warning("corrupt block file %s (%s); removed, read as a miss", path, why)
            unlink_quietly(path)
        elif outcome is ReadOutcome.FAILED:
            logger.warning("reading %s failed (%s); read as a miss", path, why)
        return False

    def _write_file(self, key: SequenceHash, path: str, data: memoryview, stamp: int) -> None:
        directory = os.path.dirname(path)
        tmp = temp_path(path, f"{self._tmp_tag}.{os.getpid()}.{next(self._tmp_counter)}")
        header = self._format.pack_header(key, data)
        try:
            fd = create_exclusive(tmp, directory)
        except OSError as e:
            raise self._write_error(e, key, path) from e
        try:
            try:
                pwritev_all(fd, [memoryview(header), data])
                os.utime(fd, ns=(stamp, stamp))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as e:
            unlink_quietly(tmp)
            if isinstance(e, OSError):
                raise self._write_error(e, key, path) from e
            raise
        if self._fsync:
            try:
                fsync_directory(directory)
            except OSError as e:
                raise self._write_error(e, key, path) from e

    def _write_error(self, e: OSError, key: SequenceHash, path: str) -> StorageError:
        doing = f"writing block {key:016x} to {path}"
        if e.errno in NO_SPACE:
            return StorageError(
                f"{doing}: {e.strerror}; free space under {self._root} or lower capacity_blocks "
                f"(now {self._capacity} blocks of {self._format.file_bytes} bytes)"
            )
        if e.errno in NO_ACCESS:
            return StorageError(
                f"{doing}: {e.strerror}; make {self._dir} writable by uid {os.getuid()} or point "
                "the disk tier at a writable directory"
            )
        return StorageError(f"{doing} failed: {e}; check the filesystem under {self._root}")

    def _scan(self) -> _Scan:
        """Index the directory's valid blocks by mtime; remove corrupt and stale temp files."""
        found: list[tuple[int, SequenceHash]] = []  # (mtime_ns, hash)
        num_corrupt = num_stale = 0
        stale_before_ns = time.time_ns() - int(STALE_TEMP_SECONDS * 1e9)
        for fanout in fanout_directories(self._dir_str):
            try:
                entries = list(os.scandir(fanout.path))
            except OSError as e:
                logger.warning("cannot list %s (%s); its blocks are not indexed", fanout.path, e)
                continue
            for entry in entries:
                if is_temp_name(entry.name):
                    num_stale += _remove_if_stale(entry, stale_before_ns)
                    continue
                key = hash_from_name(entry.name, fanout.name)
                if key is None:
                    continue  # not ours; leave it alone
                outcome, mtime_ns, why = self._format.check(entry.path, key)
                if outcome is ReadOutcome.HIT:
                    found.append((mtime_ns, key))
                elif outcome is ReadOutcome.CORRUPT:
                    logger.warning("corrupt block file %s (%s); removed", entry.path, why)
                    unlink_quietly(entry.path)
                    num_corrupt += 1
                elif outcome is ReadOutcome.FAILED:
                    logger.warning("cannot read %s (%s); not indexed", entry.path, why)
        found.sort()  # least recently used first
        with self._lock:
            self._index.clear()
            self._index.insert([key for _, key in found], _PRIORITY * len(found))
            num_evicted = self._evict_over_capacity_locked()
            self.stats.corrupt += num_corrupt
            num_indexed = len(self._index)
        return _Scan(num_indexed, num_corrupt, num_stale, num_evicted)


# ---- helpers -------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(compat_hash: int, block_bytes: int, capacity_blocks: int) -> None:
    if not _is_int(compat_hash) or not 0 <= compat_hash <= U64_MAX:
        raise ConfigError(f"compat_hash must be an unsigned 64-bit int, got {compat_hash!r}")
    if not _is_int(block_bytes) or block_bytes <= 0:
        raise ConfigError(f"block_bytes must be a positive int, got {block_bytes!r}")
    if not _is_int(capacity_blocks) or capacity_blocks < 1:
        raise ConfigError(f"capacity_blocks must be an int >= 1, got {capacity_blocks!r}")


def _open_directory(directory: Path) -> Path:
    """Create ``directory`` (with parents) and check this process can write to it."""
    root = directory.parent
    if root.exists() and not root.is_dir():
        raise ConfigError(f"disk store root {root} is not a directory; point it at a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create disk store directory {directory}: {e.strerror}; create it or choose "
            "a writable root"
        ) from e
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; remove it or choose another root")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"disk store directory {directory} is not writable by uid {os.getuid()}; fix its "
            "permissions or choose another root"
        )
    return directory


def _remove_if_stale(entry: os.DirEntry[str], stale_before_ns: int) -> bool:
    """Remove a temp file a crashed writer left; True if removed."""
    try:
        if entry.stat(follow_symlinks=False).st_mtime_ns >= stale_before_ns:
            return False
        os.unlink(entry.path)
    except FileNotFoundError:
        return False  # renamed into place or removed by another instance meanwhile
    except OSError as e:
        logger.warning("cannot remove stale temp file %s (%s)", entry.path, e)
        return False
    return True


def store_blocks(
    storage: Storage,
    block_ids: Sequence[int],
    store: SharedBlockStore,
    sequence_hashes: Sequence[SequenceHash],
) -> int:
    """Pack blocks ``block_ids`` of ``storage`` and write each to G4 under
    ``sequence_hashes[i]``; returns how many were written (the rest were there already)."""
    packed = gather_to_staging(storage, block_ids).numpy()
    rows = packed.reshape(len(block_ids), store.block_bytes)
    return store.write_many(zip(sequence_hashes, rows, strict=True))
