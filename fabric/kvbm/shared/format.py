"""The G4 block file: its header, its name under the store's directory, and its verification.

Layout::

    root/<compat_hash:016x>/<hh>/<seq_hash:016x>.kvb                 one block (hh: first 2 digits)
    root/<compat_hash:016x>/<hh>/.<seq_hash:016x>.kvb.<unique>.tmp   a write in flight

A different compatibility hash (model, dtype, KV layout, block size) is a different directory, so
a block written by an incompatible engine is never matched; the header carries the compat hash as
well and ``BlockFormat`` checks it on every read. Stores with a MAC key use the directory
``<compat_hash:016x>-k<key_id>`` (``key_id``: 8 hex digits derived from the key), so keyed and
unkeyed instances, or instances with different keys, never see (nor remove) each other's files.

File format, version 1: a 64-byte little-endian header, then the payload::

    offset  size  field
         0     4  magic         b"KVFB"
         4     2  version       1
         6     2  header_len    64 (the payload's offset)
         8     4  flags         0, or FLAG_MAC (1): bytes 40..55 hold a MAC
        12     4  reserved      0
        16     8  compat_hash   u64, equal to the directory's
        24     8  seq_hash      u64, equal to the file name's
        32     8  payload_len   u64, equal to block_bytes
        40     8  payload_xxh3  xxh3-64 (seed 0) of the payload
        48     8  created_ns    wall-clock time of the write (informational)
        56     8  header_xxh3   xxh3-64 (seed 0) of header bytes 0..55
        64     -  payload       payload_len bytes; the file ends there

    With FLAG_MAC, bytes 40..55 (payload_xxh3 and created_ns) hold instead a keyed BLAKE2b-128
    of header bytes 0..39 and the payload.

Checksums catch accidents (a torn write, a flipped bit); they are not integrity: anyone who can
write the directory can write a block that verifies. With a key (``load_mac_key``; every
instance sharing the directory holds the same one), every file carries a MAC over its header
fields and payload, and a file without a valid one is corrupt (removed, never served).

Invariants:

* A sequence hash is a u64 (``checked_hash``); it names exactly one path (``block_path``), and
  ``hash_from_name`` accepts only the names ``block_path`` produces (16 lower-case hex digits in
  the fan-out directory of their first two), so foreign files are never taken for blocks.
* A file is a block only if it holds exactly ``64 + block_bytes`` bytes and its magic, version,
  header checksum, flags, compat hash, sequence hash, length and payload checksum (keyed: MAC)
  all match (``BlockFormat.read``). ``BlockFormat.check`` verifies everything but the payload
  checksum or MAC, without reading the payload; ``BlockFormat.has_file`` only the size.
* Reading a file another process unlinks meanwhile yields the whole file or ``ABSENT``, never a
  mix: an open file descriptor keeps its bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import operator
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import xxhash

from fabric.errors import ConfigError, InvalidInput
from fabric.kvbm.core.types import SequenceHash
from fabric.kvbm.shared.file_io import GONE, preadv_all

MAGIC = b"KVFB"
FORMAT_VERSION = 1
BLOCK_SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"
U64_MAX = (1 << 64) - 1

FLAG_MAC = 1
MIN_KEY_BYTES = 32

_HEADER = struct.Struct("<4sHHIIQQQQQQ")
HEADER_BYTES = _HEADER.size
_SUMMED_BYTES = HEADER_BYTES - 8  # the header checksum covers everything before it
_MAC_COVERS = 40  # header bytes the MAC covers (magic .. payload_len), then the payload
_MAC_BYTES = 16
_U64 = struct.Struct("<Q")
_HASH_DIGITS = 16
_FANOUT_DIGITS = 2
_BLOCK_NAME_LEN = _HASH_DIGITS + len(BLOCK_SUFFIX)
_xxh3 = xxhash.xxh3_64_intdigest

logger = logging.getLogger(__name__)


# ---- names ---------------------------------------------------------------------------------


def compat_directory(root: Path, compat_hash: int, key: bytes | None = None) -> Path:
    """The directory holding the blocks of one compat hash (and MAC key, when given)."""
    name = f"{compat_hash:016x}"
    return root / (name if key is None else f"{name}-k{key_id(key)}")


# ---- keys ----------------------------------------------------------------------------------


def load_mac_key(path: Path) -> bytes:
    """The MAC key in ``path``: its bytes, without a trailing newline, at least 32 of them
    (``openssl rand -hex 32 > key`` or ``head -c 32 /dev/urandom > key``).

    Raises:
        ConfigError: the file cannot be read or is too short.
    """
    try:
        key = path.read_bytes().rstrip(b"\r\n")
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read the G4 MAC key file {path}: {e.strerror}") from e
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the G4 MAC key in {path} has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "random ones (openssl rand -hex 32)"
        )
    if mode & 0o077:
        logger.warning("G4 MAC key file %s is readable by others (mode %o)", path, mode & 0o777)
    return key


def key_id(key: bytes) -> str:
    """8 hex digits naming ``key`` (a keyed hash of a constant: reveals nothing of the key)."""
    return hashlib.blake2b(b"kv-fabric key id", key=_key64(key), digest_size=4).hexdigest()


def _key64(key: bytes) -> bytes:
    """BLAKE2b takes keys of at most 64 bytes: a longer one is hashed down to 64."""
    return key if len(key) <= 64 else hashlib.blake2b(key).digest()


def _mac(key: bytes, header: memoryview, payload: memoryview) -> bytes:
    mac = hashlib.blake2b(key=_key64(key), digest_size=_MAC_BYTES, person=b"kv-fabric-g4")
    mac.update(header[:_MAC_COVERS])
    mac.update(payload)
    return mac.digest()


def checked_hash(h: SequenceHash) -> SequenceHash:
    """``h`` as a plain int, checked to be a u64 (``InvalidInput`` otherwise)."""
    try:
        key = operator.index(h)
    except TypeError as e:
        raise InvalidInput(f"sequence hash must be an int, got {type(h).__name__}") from e
    if not 0 <= key <= U64_MAX:
        raise InvalidInput(f"sequence hash {key} is not an unsigned 64-bit int")
    return SequenceHash(key)


def block_path(directory: str, key: SequenceHash) -> str:
    """Where block ``key`` (a checked hash) lives under ``directory``."""
    name = f"{key:016x}"
    return f"{directory}/{name[:_FANOUT_DIGITS]}/{name}{BLOCK_SUFFIX}"


def temp_path(path: str, unique: str) -> str:
    """A hidden temp file next to block file ``path``; ``unique`` tells writers apart."""
    directory, name = os.path.split(path)
    return f"{directory}/.{name}.{unique}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return name.endswith(TEMP_SUFFIX)


def hash_from_name(name: str, fanout: str) -> SequenceHash | None:
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


def fanout_directories(directory: str) -> list[os.DirEntry[str]]:
    """The fan-out subdirectories of ``directory`` (none if it is gone)."""
    try:
        with os.scandir(directory) as entries:
            return [
                e
                for e in entries
                if len(e.name) == _FANOUT_DIGITS and e.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


# ---- header --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed header; ``header_intact`` says whether its checksum matched; ``mac`` is bytes
    40..55 (the MAC when ``flags`` has ``FLAG_MAC``)."""

    magic: bytes
    version: int
    header_len: int
    flags: int
    compat_hash: int
    seq_hash: int
    payload_len: int
    payload_xxh3: int
    mac: bytes
    header_intact: bool

    @staticmethod
    def pack(
        compat_hash: int, seq_hash: SequenceHash, payload: memoryview, key: bytes | None = None
    ) -> bytearray:
        """The header of a block file holding ``payload``: checksums filled in, and the MAC
        when ``key`` is given."""
        header = bytearray(HEADER_BYTES)
        flags, payload_xxh3 = (0, _xxh3(payload)) if key is None else (FLAG_MAC, 0)
        _HEADER.pack_into(
            header, 0, MAGIC, FORMAT_VERSION, HEADER_BYTES, flags, 0, compat_hash, seq_hash,
            payload.nbytes, payload_xxh3, time.time_ns(), 0,  # header_xxh3: filled last
        )  # fmt: skip
        if key is not None:
            header[_MAC_COVERS:_SUMMED_BYTES] = _mac(key, memoryview(header), payload)
        _U64.pack_into(header, _SUMMED_BYTES, _xxh3(memoryview(header)[:_SUMMED_BYTES]))
        return header

    @classmethod
    def unpack(cls, raw: bytes | bytearray) -> Header:
        magic, version, header_len, flags, _, compat, seq, length, payload_xxh3, _, header_xxh3 = (
            _HEADER.unpack(raw)
        )
        intact = _xxh3(memoryview(raw)[:_SUMMED_BYTES]) == header_xxh3
        mac = bytes(raw[_MAC_COVERS:_SUMMED_BYTES])
        return cls(
            magic, version, header_len, flags, compat, seq, length, payload_xxh3, mac, intact
        )

    def problem(
        self, compat_hash: int, seq_hash: int, payload_len: int, *, keyed: bool = False
    ) -> str | None:
        """Why this header does not describe the block expected (by a store with a MAC key
        when ``keyed``), or None when it does."""
        if self.magic != MAGIC:
            return f"bad magic {self.magic!r}"
        if self.version != FORMAT_VERSION or self.header_len != HEADER_BYTES:
            return f"format version {self.version} with a {self.header_len}-byte header"
        if not self.header_intact:
            return "header checksum mismatch"
        if self.flags & ~FLAG_MAC:
            return f"unknown flags {self.flags:#x}"
        if keyed and not self.flags & FLAG_MAC:
            return "no MAC: not written with this store's key"
        if not keyed and self.flags & FLAG_MAC:
            return "written with a MAC key; this store has none"
        if self.compat_hash != compat_hash:
            return f"compat hash {self.compat_hash:016x}, expected {compat_hash:016x}"
        if self.seq_hash != seq_hash:
            return f"sequence hash {self.seq_hash:016x}, expected {seq_hash:016x}"
        if self.payload_len != payload_len:
            return f"payload of {self.payload_len} bytes, expected {payload_len}"
        return None


# ---- verification --------------------------------------------------------------------------


class ReadOutcome(Enum):
    """How reading or checking one block file ended."""

    HIT = "hit"
    ABSENT = "absent"
    CORRUPT = "corrupt"
    FAILED = "failed"  # an I/O error that says nothing about the file's content (EIO, EACCES)


@dataclass(frozen=True, slots=True)
class BlockFormat:
    """The block files of one compat hash and payload size (and MAC key, when given): what a
    write stamps into the header and what a read or a scan accepts."""

    compat_hash: int
    block_bytes: int
    key: bytes | None = field(default=None, repr=False)

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.block_bytes

    def pack_header(self, seq_hash: SequenceHash, payload: memoryview) -> bytearray:
        return Header.pack(self.compat_hash, seq_hash, payload, self.key)

    def has_file(self, path: str) -> bool:
        """A regular file of a block's size is at ``path`` (its content is not checked)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self.file_bytes

    def read(
        self, path: str, seq_hash: SequenceHash, payload: memoryview
    ) -> tuple[ReadOutcome, str]:
        """Read header and payload (into ``payload``) with one ``preadv`` and verify both.

        Returns:
            (outcome, reason); the reason is empty on a hit or when the file is absent.
        """
        header = bytearray(HEADER_BYTES)
        beyond = bytearray(1)  # a byte read past the payload means the file is too long
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return (ReadOutcome.ABSENT, "") if e.errno in GONE else (ReadOutcome.FAILED, str(e))
        try:
            num_read = preadv_all(fd, [memoryview(header), payload, memoryview(beyond)])
        except OSError as e:
            return (ReadOutcome.ABSENT, "") if e.errno in GONE else (ReadOutcome.FAILED, str(e))
        finally:
            os.close(fd)
        file_bytes = self.file_bytes
        if num_read != file_bytes:
            qualifier = "truncated at" if num_read < file_bytes else "longer than"
            return ReadOutcome.CORRUPT, f"{qualifier} {min(num_read, file_bytes)} bytes"
        parsed = Header.unpack(header)
        problem = parsed.problem(
            self.compat_hash, seq_hash, self.block_bytes, keyed=self.key is not None
        )
        if problem is not None:
            return ReadOutcome.CORRUPT, problem
        if self.key is None:
            if _xxh3(payload) != parsed.payload_xxh3:
                return ReadOutcome.CORRUPT, "payload checksum mismatch"
        elif not hmac.compare_digest(_mac(self.key, memoryview(header), payload), parsed.mac):
            return ReadOutcome.CORRUPT, "MAC mismatch: not written with this store's key"
        return ReadOutcome.HIT, ""

    def check(self, path: str, seq_hash: SequenceHash) -> tuple[ReadOutcome, int, str]:
        """Verify a file's size and header without reading its payload.

        Returns:
            (outcome, mtime_ns, reason); mtime_ns is 0 and the reason empty unless stated.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            gone = e.errno in GONE
            return (ReadOutcome.ABSENT, 0, "") if gone else (ReadOutcome.FAILED, 0, str(e))
        try:
            st = os.fstat(fd)
            raw = os.pread(fd, HEADER_BYTES, 0)
        except OSError as e:
            gone = e.errno in GONE
            return (ReadOutcome.ABSENT, 0, "") if gone else (ReadOutcome.FAILED, 0, str(e))
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            return ReadOutcome.FAILED, 0, "not a regular file"
        if st.st_size != self.file_bytes or len(raw) != HEADER_BYTES:
            return ReadOutcome.CORRUPT, 0, f"{st.st_size} bytes, expected {self.file_bytes}"
        problem = Header.unpack(raw).problem(
            self.compat_hash, seq_hash, self.block_bytes, keyed=self.key is not None
        )
        if problem is not None:
            return ReadOutcome.CORRUPT, 0, problem
        return ReadOutcome.HIT, st.st_mtime_ns, ""
