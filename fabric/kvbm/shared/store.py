"""The shared disk tier: a content-addressed, persistent block store on a shared directory.

``SharedBlockStore`` keeps one file per block in a directory that several worker processes
(and, over a network filesystem, several hosts) share. A file is named by its block's sequence
hash, so every instance that computes the same hash finds the bytes another one wrote, and the
cache survives a restart (``rescan``, which the constructor runs, rebuilds the index from the
files).

Layout::

    root/<compat_hash:016x>/<hh>/<seq_hash:016x>.kvb                 one block (hh: first 2 digits)
    root/<compat_hash:016x>/<hh>/.<seq_hash:016x>.kvb.<tag>.tmp      a write in flight

A different compatibility hash (model, dtype, KV layout, block size) is a different directory, so
a block written by an incompatible engine is never matched; the header carries the compat hash as
well and it is checked on every read. Instances sharing a compat hash must share ``block_bytes``:
a file of another payload length reads as corrupt.

File format, version 1: a 64-byte little-endian header, then the payload::

    offset  size  field
         0     4  magic         b"KVFB"
         4     2  version       1
         6     2  header_len    64 (the payload's offset)
         8     4  flags         0 (reserved)
        12     4  reserved      0
        16     8  compat_hash   u64, equal to the directory's
        24     8  seq_hash      u64, equal to the file name's
        32     8  payload_len   u64, equal to block_bytes
        40     8  payload_xxh3  xxh3-64 (seed 0) of the payload
        48     8  created_ns    wall-clock time of the write (informational)
        56     8  header_xxh3   xxh3-64 (seed 0) of header bytes 0..55
        64     -  payload       payload_len bytes; the file ends there

Invariants:

* A file under a block's name is complete. A writer fills a uniquely named temp file in the same
  fan-out directory (``fsync`` optional), stamps its mtime and ``os.replace``-s it into place, so
  two writers of one hash race harmlessly (same bytes; the last rename wins). A failed write
  leaves no temp file; ``rescan`` removes temp files of crashed writers once they are older than
  ``STALE_TEMP_SECONDS`` (hosts sharing a directory need clocks closer than that).
* A read serves a block only if the file holds exactly ``64 + block_bytes`` bytes and its magic,
  version, header checksum, compat hash, sequence hash, length and payload checksum all match.
  Anything else is a miss; a corrupt file is removed (WARNING, ``stats.corrupt``), never served.
  A reader racing another process's eviction (unlink) reads the whole file or finds none: a miss,
  never garbage. After a miss the bytes in ``out`` are unspecified.
* The index is an LRU-ordered dict guarded by one lock. Reads and writes of payloads happen
  outside it; evictions unlink under it, and a write's "already there" check (a ``stat``) and
  the indexing that follows happen under it too, so a block is never indexed after this
  instance unlinked its file. After each call it holds at most ``capacity_blocks`` hashes;
  indexing one more unlinks the least recently used file. Recency lives in the file mtime too:
  a hit or a skipped write stamps it (``os.utime``), so it survives restarts and other instances
  see it; ``rescan`` orders by mtime.
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

import errno
import itertools
import logging
import operator
import os
import secrets
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import xxhash

from fabric.errors import ConfigError, InvalidInput, StorageError
from fabric.kvbm.core.types import SequenceHash
from fabric.kvbm.tiers.block_copy import gather_to_staging
from fabric.kvbm.tiers.storage import Storage

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BlockBuffer: TypeAlias = "np.ndarray | torch.Tensor | bytes | bytearray | memoryview"
"""A C-contiguous buffer of one block's bytes (a torch tensor must be on the CPU)."""

MAGIC = b"KVFB"
FORMAT_VERSION = 1
BLOCK_SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 60.0
"""``rescan`` removes temp files older than this: writers that crashed mid-write left them."""

_HEADER = struct.Struct("<4sHHIIQQQQQQ")
HEADER_BYTES = _HEADER.size
_SUMMED_BYTES = HEADER_BYTES - 8  # the header checksum covers everything before it
_U64 = struct.Struct("<Q")
_U64_MAX = (1 << 64) - 1
_HASH_DIGITS = 16
_FANOUT_DIGITS = 2
_BLOCK_NAME_LEN = _HASH_DIGITS + len(BLOCK_SUFFIX)
_xxh3 = xxhash.xxh3_64_intdigest

_GONE = frozenset({errno.ENOENT, errno.ESTALE})  # unlinked by another instance (ESTALE: NFS)
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


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


class _Read(Enum):
    """How reading one block file ended."""

    HIT = "hit"
    ABSENT = "absent"
    CORRUPT = "corrupt"
    FAILED = "failed"  # an I/O error that says nothing about the file's content (EIO, EACCES)


@dataclass(frozen=True, slots=True)
class _Header:
    magic: bytes
    version: int
    header_len: int
    compat_hash: int
    seq_hash: int
    payload_len: int
    payload_xxh3: int
    header_intact: bool

    @classmethod
    def unpack(cls, raw: bytes | bytearray) -> _Header:
        magic, version, header_len, _, _, compat, seq, length, payload_xxh3, _, header_xxh3 = (
            _HEADER.unpack(raw)
        )
        intact = _xxh3(memoryview(raw)[:_SUMMED_BYTES]) == header_xxh3
        return cls(magic, version, header_len, compat, seq, length, payload_xxh3, intact)

    def problem(self, compat_hash: int, seq_hash: int, payload_len: int) -> str | None:
        """Why this header does not describe the block expected, or None when it does."""
        if self.magic != MAGIC:
            return f"bad magic {self.magic!r}"
        if self.version != FORMAT_VERSION or self.header_len != HEADER_BYTES:
            return f"format version {self.version} with a {self.header_len}-byte header"
        if not self.header_intact:
            return "header checksum mismatch"
        if self.compat_hash != compat_hash:
            return f"compat hash {self.compat_hash:016x}, expected {compat_hash:016x}"
        if self.seq_hash != seq_hash:
            return f"sequence hash {self.seq_hash:016x}, expected {seq_hash:016x}"
        if self.payload_len != payload_len:
            return f"payload of {self.payload_len} bytes, expected {payload_len}"
        return None


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
    """

    def __init__(
        self,
        root: Path,
        *,
        compat_hash: int,
        block_bytes: int,
        capacity_blocks: int,
        fsync: bool = False,
    ) -> None:
        _check_config(compat_hash, block_bytes, capacity_blocks)
        self._root = Path(root)
        self._compat_hash = compat_hash
        self._block_bytes = block_bytes
        self._capacity = capacity_blocks
        self._fsync = fsync
        self._file_bytes = HEADER_BYTES + block_bytes
        self._dir = _open_directory(self._root / f"{compat_hash:016x}")
        self._dir_str = os.fspath(self._dir)
        self._tmp_tag = secrets.token_hex(4)
        self._tmp_counter = itertools.count()
        self._lock = threading.RLock()
        self._index: OrderedDict[SequenceHash, None] = OrderedDict()
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
        return self._compat_hash

    @property
    def block_bytes(self) -> int:
        return self._block_bytes

    @property
    def capacity_blocks(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __repr__(self) -> str:
        return (
            f"SharedBlockStore({self._dir_str!r}, blocks={len(self)}/{self._capacity}, "
            f"block_bytes={self._block_bytes})"
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
        if not self._has_block_file(path):
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
        data = _byte_view(payload, self._block_bytes, "payload", writable=False)
        key, path = self._locate(h)
        with self._lock:  # decided and indexed atomically: an eviction unlinks under this lock
            indexed = key in self._index
            stamp = self._next_stamp_locked()
            # Present: indexed and still on disk (stamping it proves that), or written by
            # another instance. An indexed file another instance evicted is written again.
            if (indexed and _touch(path, stamp)) or self._has_block_file(path):
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
        view = _byte_view(out, self._block_bytes, "out", writable=True)
        return self._read_one(h, view)

    def read_many(self, hashes: Sequence[SequenceHash], out: np.ndarray) -> int:
        """Read ``hashes[i]`` into row ``i`` of ``out`` (``[>= len(hashes), block_bytes]`` bytes).

        Reads in order and stops at the first miss. Returns how many leading rows hold blocks.
        """
        self._check_open()
        num = len(hashes)
        rows = _rows_view(out, num, self._block_bytes)
        bb = self._block_bytes
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
            if indexed:
                del self._index[key]
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
        """The normalised hash and its file path."""
        try:
            key = operator.index(h)
        except TypeError as e:
            raise InvalidInput(f"sequence hash must be an int, got {type(h).__name__}") from e
        if not 0 <= key <= _U64_MAX:
            raise InvalidInput(f"sequence hash {key} is not an unsigned 64-bit int")
        name = f"{key:016x}"
        return SequenceHash(key), f"{self._dir_str}/{name[:_FANOUT_DIGITS]}/{name}{BLOCK_SUFFIX}"

    def _next_stamp_locked(self) -> int:
        """A wall-clock ns timestamp, strictly increasing within this store (recency order)."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _has_block_file(self, path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self._file_bytes

    def _index_recent(self, key: SequenceHash, *, adopted: bool, path: str | None = None) -> None:
        """Make ``key`` the most recently used entry (adding it if new) and evict over capacity.

        With ``path``, also stamp the file's mtime.
        """
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                victims: list[SequenceHash] = []
            else:
                self._index[key] = None
                self.stats.adopted += adopted
                victims = self._pop_victims_locked()
            stamp = self._next_stamp_locked()
            # Unlinked before the lock is let go, so no ``write`` can see a victim's file,
            # skip, and index a block whose file then disappears.
            self._unlink_victims(victims)
        if path is not None:
            _touch(path, stamp)

    def _pop_victims_locked(self) -> list[SequenceHash]:
        victims = []
        while len(self._index) > self._capacity:
            victim, _ = self._index.popitem(last=False)
            victims.append(victim)
        self.stats.evicted += len(victims)
        return victims

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
        outcome, why = self._read_file(key, path, view)
        if outcome is _Read.HIT:
            with self._lock:
                self.stats.hits += 1
            self._index_recent(key, adopted=True, path=path)
            return True
        with self._lock:
            self.stats.misses += 1
            self._index.pop(key, None)
            if outcome is _Read.CORRUPT:
                self.stats.corrupt += 1
        if outcome is _Read.CORRUPT:
            logger.warning("corrupt block file %s (%s); removed, read as a miss", path, why)
            _unlink_quietly(path)
        elif outcome is _Read.FAILED:
            logger.warning("reading %s failed (%s); read as a miss", path, why)
        return False

    def _read_file(self, key: SequenceHash, path: str, view: memoryview) -> tuple[_Read, str]:
        """Read header and payload (into ``view``) with one ``preadv`` and verify both."""
        header = bytearray(HEADER_BYTES)
        beyond = bytearray(1)  # a byte read past the payload means the file is too long
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return (_Read.ABSENT, "") if e.errno in _GONE else (_Read.FAILED, str(e))
        try:
            num_read = _preadv_all(fd, [memoryview(header), view, memoryview(beyond)])
        except OSError as e:
            return (_Read.ABSENT, "") if e.errno in _GONE else (_Read.FAILED, str(e))
        finally:
            os.close(fd)
        if num_read != self._file_bytes:
            qualifier = "truncated at" if num_read < self._file_bytes else "longer than"
            return _Read.CORRUPT, f"{qualifier} {min(num_read, self._file_bytes)} bytes"
        parsed = _Header.unpack(header)
        problem = parsed.problem(self._compat_hash, key, self._block_bytes)
        if problem is not None:
            return _Read.CORRUPT, problem
        if _xxh3(view) != parsed.payload_xxh3:
            return _Read.CORRUPT, "payload checksum mismatch"
        return _Read.HIT, ""

    def _write_file(self, key: SequenceHash, path: str, data: memoryview, stamp: int) -> None:
        directory, name = os.path.split(path)
        tmp = (
            f"{directory}/.{name}.{self._tmp_tag}.{os.getpid()}."
            f"{next(self._tmp_counter)}{TEMP_SUFFIX}"
        )
        header = bytearray(HEADER_BYTES)
        _HEADER.pack_into(
            header, 0, MAGIC, FORMAT_VERSION, HEADER_BYTES, 0, 0, self._compat_hash, key,
            self._block_bytes, _xxh3(data), time.time_ns(), 0,  # header_xxh3: filled next
        )  # fmt: skip
        _U64.pack_into(header, _SUMMED_BYTES, _xxh3(memoryview(header)[:_SUMMED_BYTES]))
        try:
            fd = _create_exclusive(tmp, directory)
        except OSError as e:
            raise self._write_error(e, key, path) from e
        try:
            try:
                _pwritev_all(fd, [memoryview(header), data])
                os.utime(fd, ns=(stamp, stamp))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as e:
            _unlink_quietly(tmp)
            if isinstance(e, OSError):
                raise self._write_error(e, key, path) from e
            raise
        if self._fsync:
            try:
                _fsync_directory(directory)
            except OSError as e:
                raise self._write_error(e, key, path) from e

    def _write_error(self, e: OSError, key: SequenceHash, path: str) -> StorageError:
        doing = f"writing block {key:016x} to {path}"
        if e.errno in _NO_SPACE:
            return StorageError(
                f"{doing}: {e.strerror}; free space under {self._root} or lower capacity_blocks "
                f"(now {self._capacity} blocks of {self._file_bytes} bytes)"
            )
        if e.errno in _NO_ACCESS:
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
        for fanout in _subdirectories(self._dir_str):
            try:
                entries = list(os.scandir(fanout.path))
            except OSError as e:
                logger.warning("cannot list %s (%s); its blocks are not indexed", fanout.path, e)
                continue
            for entry in entries:
                if entry.name.endswith(TEMP_SUFFIX):
                    num_stale += _remove_if_stale(entry, stale_before_ns)
                    continue
                key = _hash_from_name(entry.name, fanout.name)
                if key is None:
                    continue  # not ours; leave it alone
                outcome, mtime_ns, why = self._check_header_file(entry.path, key)
                if outcome is _Read.HIT:
                    found.append((mtime_ns, key))
                elif outcome is _Read.CORRUPT:
                    logger.warning("corrupt block file %s (%s); removed", entry.path, why)
                    _unlink_quietly(entry.path)
                    num_corrupt += 1
                elif outcome is _Read.FAILED:
                    logger.warning("cannot read %s (%s); not indexed", entry.path, why)
        found.sort()
        num_over = max(0, len(found) - self._capacity)
        victims = [key for _, key in found[:num_over]]
        with self._lock:
            self._index = OrderedDict((key, None) for _, key in found[num_over:])
            self.stats.corrupt += num_corrupt
            self.stats.evicted += num_over
            num_indexed = len(self._index)
        self._unlink_victims(victims)
        return _Scan(num_indexed, num_corrupt, num_stale, num_over)

    def _check_header_file(self, path: str, key: SequenceHash) -> tuple[_Read, int, str]:
        """(outcome, mtime_ns, reason) from the header and size of one block file."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return (_Read.ABSENT, 0, "") if e.errno in _GONE else (_Read.FAILED, 0, str(e))
        try:
            st = os.fstat(fd)
            raw = os.pread(fd, HEADER_BYTES, 0)
        except OSError as e:
            return (_Read.ABSENT, 0, "") if e.errno in _GONE else (_Read.FAILED, 0, str(e))
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            return _Read.FAILED, 0, "not a regular file"
        if st.st_size != self._file_bytes or len(raw) != HEADER_BYTES:
            return _Read.CORRUPT, 0, f"{st.st_size} bytes, expected {self._file_bytes}"
        problem = _Header.unpack(raw).problem(self._compat_hash, key, self._block_bytes)
        if problem is not None:
            return _Read.CORRUPT, 0, problem
        return _Read.HIT, st.st_mtime_ns, ""


# ---- helpers -------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(compat_hash: int, block_bytes: int, capacity_blocks: int) -> None:
    if not _is_int(compat_hash) or not 0 <= compat_hash <= _U64_MAX:
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


def _byte_view(buf: Any, nbytes: int, what: str, *, writable: bool) -> memoryview:
    """A flat byte view of a C-contiguous buffer of exactly ``nbytes`` bytes (no copy)."""
    if hasattr(buf, "untyped_storage"):  # a torch.Tensor, without importing torch here
        buf = _tensor_bytes(buf, what)
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise InvalidInput(f"{what} must be C-contiguous; pass np.ascontiguousarray(...)")
        buf = buf.reshape(-1).view(np.uint8)
    try:
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError) as e:
        raise InvalidInput(
            f"{what} must be a C-contiguous numpy array, CPU tensor or bytes-like buffer, got "
            f"{type(buf).__name__} ({e})"
        ) from e
    if writable and view.readonly:
        raise InvalidInput(f"{what} is read-only; pass a writable array")
    if view.nbytes != nbytes:
        raise InvalidInput(f"{what} holds {view.nbytes} bytes; a block is {nbytes}")
    return view


def _tensor_bytes(tensor: torch.Tensor, what: str) -> np.ndarray:
    import torch

    if tensor.device.type != "cpu":
        raise InvalidInput(f"{what} is on {tensor.device}; copy it to a CPU tensor first")
    if not tensor.is_contiguous():
        raise InvalidInput(f"{what} must be a contiguous tensor; call .contiguous() first")
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def _rows_view(out: Any, num_rows: int, row_bytes: int) -> memoryview:
    """A flat writable byte view of ``out``, checked to be rows of ``row_bytes``, ``num_rows``+."""
    shape = tuple(getattr(out, "shape", ()))
    if not shape or shape[0] < num_rows or getattr(out, "nbytes", None) != shape[0] * row_bytes:
        raise InvalidInput(
            f"out must be an array shaped [num_blocks, block_bytes] of uint8 with at least "
            f"{num_rows} rows of {row_bytes} bytes, got {type(out).__name__} {shape}"
        )
    return _byte_view(out, shape[0] * row_bytes, "out", writable=True)


def _preadv_all(fd: int, views: list[memoryview]) -> int:
    """Fill ``views`` from file offset 0 until they are full or the file ends; bytes read."""
    done = 0
    while views:
        n = os.preadv(fd, views, done)
        if n == 0:
            break
        done += n
        views = _advance(views, n)
    return done


def _pwritev_all(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` back to back from file offset 0."""
    done = 0
    while views:
        n = os.pwritev(fd, views, done)
        if n == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n
        views = _advance(views, n)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def _create_exclusive(path: str, directory: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)  # first block of this fan-out directory
        return os.open(path, flags, 0o666)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _touch(path: str, stamp_ns: int) -> bool:
    """Set the file's mtime (its recency for restarts and other instances); False if it is gone.

    Best effort otherwise: a file we may not stamp (another user's) keeps its mtime.
    """
    try:
        os.utime(path, ns=(stamp_ns, stamp_ns))
    except OSError as e:
        return e.errno not in _GONE
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("cannot remove %s (%s)", path, e)


def _subdirectories(directory: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return [
                e
                for e in entries
                if len(e.name) == _FANOUT_DIGITS and e.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


def _hash_from_name(name: str, fanout: str) -> SequenceHash | None:
    """The hash a block file name encodes, or None for a name that is not a block's."""
    if len(name) != _BLOCK_NAME_LEN or not name.endswith(BLOCK_SUFFIX):
        return None
    digits = name[:_HASH_DIGITS]
    try:
        key = int(digits, 16)
    except ValueError:
        return None
    if f"{key:016x}" != digits or digits[:_FANOUT_DIGITS] != fanout:
        return None
    return SequenceHash(key)


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
