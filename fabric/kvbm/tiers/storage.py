"""Backing storage for a pool's blocks: device / host tensors and one preallocated disk file.

A storage owns the memory (or file) behind one ``LayoutSpec`` and describes it as ``BufferInfo``
records (defined in ``fabric.transfer.memory``, re-exported here) a transfer agent can register.
It knows nothing of block states; ``copy.py`` moves blocks.

* ``TensorStorage`` (DRAM or VRAM): one tensor per layout buffer, shaped by
  ``LayoutSpec.tensor_shapes``. Built by ``device_storage``, ``host_storage`` (pinned when CUDA is
  available; optionally in a named ``SharedMemory`` segment another process attaches to) or
  ``adopt_tensors`` (an engine's own KV tensors, checked against the layout, never freed by us).
  Allocated buffers start on a multiple of ``layout.alignment`` (shared segments: page size).
* ``DiskStorage`` (FILE): one file of ``layout.buffer_bytes`` bytes in fully-contiguous order,
  preallocated (``posix_fallocate``, else zero-filled). It uses ``O_DIRECT`` when the filesystem
  accepts it and ``block_stride`` is a multiple of 4096; then every buffer handed to
  ``read_into``/``write_from`` must be 4096-byte aligned (``staging_buffer`` gives one).
  File I/O moves whole block strides (padding included), so runs of adjacent blocks are one call;
  ``read_into`` cuts runs into ``READ_PIECE_BYTES`` reads and keeps ``READ_THREADS`` in flight.

Invariants: ``close`` is idempotent and releases what the storage created (tensors, the shared
segment if this process created it, the file unless ``keep_file``); it never frees adopted tensors
and an attaching process never unlinks a shared segment.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fabric.errors import InvalidInput, LayoutMismatch, StorageError
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.tiers.copy_plan import forget as forget_plans
from fabric.transfer.memory import BufferInfo, MemoryKind

logger = logging.getLogger(__name__)

DIRECT_IO_ALIGNMENT = 4096
"""Offsets, lengths and buffer addresses of ``O_DIRECT`` I/O are multiples of this."""

READ_PIECE_BYTES = 1 << 20
"""``read_into`` cuts runs into reads of at most this many bytes (a multiple of 4096)..."""
READ_THREADS = 4
"""...and keeps up to this many in flight: one blocking read at a time left the disk idle
between requests (tiers-vs-peers, 256 KiB loads from G3)."""

_ZERO_FILL_CHUNK = 16 << 20
_FALLOCATE_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})


class Storage(Protocol):
    """The buffers behind one layout."""

    layout: LayoutSpec
    kind: MemoryKind

    def buffers(self) -> list[BufferInfo]: ...

    def close(self) -> None: ...


class TensorStorage:
    """Memory storage: ``tensors[i]`` is buffer ``i`` of ``layout`` (DRAM or VRAM)."""

    def __init__(
        self,
        layout: LayoutSpec,
        tensors: list[torch.Tensor],
        kind: MemoryKind,
        *,
        shm: SharedMemory | None = None,
        unlink_on_close: bool = False,
    ) -> None:
        self.layout = layout
        self.tensors = tensors
        self.kind = kind
        self._shm = shm
        self._unlink_on_close = unlink_on_close

    def buffers(self) -> list[BufferInfo]:
        return [
            BufferInfo(
                address=t.data_ptr(),
                nbytes=self.layout.buffer_bytes,
                kind=self.kind,
                device_id=t.device.index or 0,
                path=None,
            )
            for t in self.tensors
        ]

    def block_view(self, block_id: int, layer: int, outer: int) -> torch.Tensor:
        """The ``(block_size, inner_dim)`` chunk of one block, layer and outer; aliases storage."""
        (block,) = self.layout.block_id_array([block_id])
        buffer_index, chunk = self.layout.chunk_location(layer, outer)
        view = self.layout.chunk_view(self.tensors[buffer_index])[block, chunk]
        return view.view(self.layout.block_size, self.layout.inner_dim)

    def close(self) -> None:
        """Drop the tensors; close (and, if this process created it, unlink) a shared segment."""
        forget_plans(self)  # cached copy plans hold views of the tensors
        self.tensors = []
        shm, self._shm = self._shm, None
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:
            logger.warning(
                "shared segment %s still has live views; it is unmapped when they are freed",
                shm.name,
            )
        if self._unlink_on_close:
            shm.unlink()


def _typed_buffers(raw: torch.Tensor, layout: LayoutSpec) -> list[torch.Tensor]:
    """Cut an aligned uint8 allocation into the layout's typed buffers (aliasing ``raw``)."""
    shapes = layout.tensor_shapes()
    nbytes = layout.buffer_bytes
    return [
        raw[i * nbytes : (i + 1) * nbytes].view(layout.dtype).view(shape)
        for i, shape in enumerate(shapes)
    ]


def _aligned_empty(layout: LayoutSpec, device: torch.device, pin: bool) -> torch.Tensor:
    total, alignment = layout.total_bytes, layout.alignment
    raw = torch.empty(total + alignment - 1, dtype=torch.uint8, device=device, pin_memory=pin)
    start = -raw.data_ptr() % alignment
    return raw[start : start + total]


def device_storage(layout: LayoutSpec, device: torch.device | str | None = None) -> TensorStorage:
    """Storage on ``device`` (default: CUDA when available, else CPU); VRAM only on CUDA.

    Zero-filled once: attention kernels read whole pages and mask the slots past a sequence's
    end, and a masked slot holding a NaN or inf bit pattern (fresh memory can) still poisons the
    result (0 * NaN = NaN). After that, slots only ever hold KV that was written, all finite.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    kind = MemoryKind.VRAM if device.type == "cuda" else MemoryKind.DRAM
    raw = _aligned_empty(layout, device, pin=False).zero_()
    logger.debug("device storage: %d bytes on %s", layout.total_bytes, device)
    return TensorStorage(layout, _typed_buffers(raw, layout), kind)


def host_storage(
    layout: LayoutSpec,
    *,
    pin: bool | None = None,
    shared_name: str | None = None,
    create: bool = True,
) -> TensorStorage:
    """Host (DRAM) storage, pinned when CUDA is available unless ``pin`` is False.

    With ``shared_name`` the buffers live in a ``SharedMemory`` segment of that name: the creator
    (``create=True``) unlinks it on ``close``; another process attaches with ``create=False`` and
    sees the same bytes. Shared segments are page-aligned and not pinned.
    """
    cuda = torch.cuda.is_available()
    if pin and not cuda:
        raise InvalidInput("pin=True needs CUDA, which is not available; pass pin=None or False")
    if shared_name is None:
        raw = _aligned_empty(layout, torch.device("cpu"), pin=cuda if pin is None else pin)
        return TensorStorage(layout, _typed_buffers(raw, layout), MemoryKind.DRAM)
    if pin:
        raise InvalidInput(
            f"pin=True with shared_name={shared_name!r}: shared segments are not pinned"
        )
    if layout.alignment > mmap.PAGESIZE:
        raise InvalidInput(
            f"alignment={layout.alignment} exceeds the page size {mmap.PAGESIZE}, the alignment "
            "of shared segments"
        )
    shm = _open_segment(shared_name, layout.total_bytes, create)
    raw = torch.frombuffer(shm.buf, dtype=torch.uint8, count=layout.total_bytes)
    logger.info(
        "host storage in shared segment %s (%d bytes, %s)",
        shared_name,
        layout.total_bytes,
        "created" if create else "attached",
    )
    return TensorStorage(
        layout, _typed_buffers(raw, layout), MemoryKind.DRAM, shm=shm, unlink_on_close=create
    )


def _open_segment(name: str, nbytes: int, create: bool) -> SharedMemory:
    try:
        shm = SharedMemory(name=name, create=create, size=nbytes if create else 0)
    except FileExistsError as e:
        raise StorageError(
            f"shared segment {name!r} already exists; attach with create=False or pick another name"
        ) from e
    except FileNotFoundError as e:
        raise StorageError(
            f"shared segment {name!r} does not exist; its creator must call "
            "host_storage(..., create=True) first"
        ) from e
    if not create:
        # Attaching registers the segment with this process's resource tracker, which would
        # unlink it when this process exits; only the creator may unlink.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        if shm.size < nbytes:
            shm.close()
            raise LayoutMismatch(
                f"shared segment {name!r} holds {shm.size} bytes; this layout needs {nbytes}"
            )
    return shm


def adopt_tensors(layout: LayoutSpec, tensors: Sequence[torch.Tensor]) -> TensorStorage:
    """Wrap an engine's existing KV tensors (checked by ``layout.check_tensors``); never freed."""
    layout.check_tensors(tensors)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise LayoutMismatch(f"tensors are on several devices {sorted(map(str, devices))}; use one")
    kind = MemoryKind.VRAM if tensors[0].device.type == "cuda" else MemoryKind.DRAM
    return TensorStorage(layout, list(tensors), kind)


def _byte_array(buf: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor or array (no copy)."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise InvalidInput(f"{what} must be a contiguous CPU tensor, got {buf.device} tensor")
        return buf.reshape(-1).view(torch.uint8).numpy()
    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
        raise InvalidInput(f"{what} must be a contiguous numpy array or CPU tensor")
    return buf.reshape(-1).view(np.uint8)


class DiskStorage:
    """One preallocated file holding ``layout``'s blocks in fully-contiguous order."""

    kind = MemoryKind.FILE

    def __init__(
        self,
        layout: LayoutSpec,
        directory: str | os.PathLike[str],
        filename: str | None = None,
        *,
        keep_file: bool = False,
        o_direct: bool = True,
        zerofill_fallback: bool = True,
    ) -> None:
        if layout.kind is not LayoutKind.FULLY_CONTIGUOUS:
            raise LayoutMismatch(
                f"disk storage needs a FULLY_CONTIGUOUS layout, got {layout.kind.name}"
            )
        directory = Path(directory)
        if not directory.is_dir():
            raise StorageError(
                f"disk storage directory {directory} does not exist; create it first"
            )
        self.layout = layout
        self.keep_file = keep_file
        self._want_direct = o_direct
        self._zerofill_fallback = zerofill_fallback
        self.path = directory / (filename or f"kvbm-{os.getpid()}-{uuid.uuid4().hex[:12]}.bin")
        needed = layout.buffer_bytes
        stats = os.statvfs(directory)
        free = stats.f_bavail * stats.f_frsize
        if free < needed:
            raise StorageError(
                f"disk storage needs {needed} bytes in {directory} but only {free} are free"
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError as e:
            raise StorageError(f"{self.path} already exists; remove it or pick another name") from e
        except OSError as e:
            raise StorageError(f"cannot create {self.path}: {e}") from e
        try:
            self._preallocate(fd, needed, free)
            self._fd, self.direct = self._maybe_reopen_direct(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        logger.info(
            "disk storage %s: %d bytes, %s I/O",
            self.path,
            needed,
            "O_DIRECT" if self.direct else "buffered",
        )

    def _preallocate(self, fd: int, needed: int, free: int) -> None:
        try:
            os.posix_fallocate(fd, 0, needed)
            return
        except OSError as e:
            if e.errno not in _FALLOCATE_UNSUPPORTED:
                raise self._io_error(e, "preallocating", needed, free) from e
            if not self._zerofill_fallback:
                raise StorageError(
                    f"posix_fallocate is not supported for {self.path} ({e}) and the zero-fill "
                    "fallback is off (FABRIC_DISK_ZEROFILL_FALLBACK / "
                    "DYN_KVBM_DISK_ZEROFILL_FALLBACK); enable it or use another filesystem"
                ) from e
            logger.info("posix_fallocate unsupported on %s (%s); zero-filling", self.path, e)
        zeros = memoryview(bytes(min(_ZERO_FILL_CHUNK, needed)))
        try:
            for offset in range(0, needed, len(zeros)):
                _pwrite_all(fd, zeros[: min(len(zeros), needed - offset)], offset)
        except OSError as e:
            raise self._io_error(e, "zero-filling", needed, free) from e

    def _io_error(self, e: OSError, doing: str, needed: int, free: int) -> StorageError:
        if e.errno == errno.ENOSPC:
            return StorageError(
                f"no space left {doing} {self.path}: needs {needed} bytes, {free} were free"
            )
        return StorageError(f"{doing} {self.path} failed: {e}")

    def _maybe_reopen_direct(self, fd: int) -> tuple[int, bool]:
        if (
            not self._want_direct
            or not hasattr(os, "O_DIRECT")
            or self.layout.block_stride % DIRECT_IO_ALIGNMENT
        ):
            return fd, False
        try:
            direct_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            logger.info("O_DIRECT refused for %s (%s); using buffered I/O", self.path, e)
            return fd, False
        os.close(fd)
        return direct_fd, True

    def buffers(self) -> list[BufferInfo]:
        return [
            BufferInfo(
                address=0,
                nbytes=self.layout.buffer_bytes,
                kind=MemoryKind.FILE,
                device_id=self._fd,
                path=str(self.path),
            )
        ]

    def staging_buffer(self, num_blocks: int) -> np.ndarray:
        """A zeroed, page-aligned uint8 array of ``num_blocks * block_stride`` bytes."""
        nbytes = num_blocks * self.layout.block_stride
        if nbytes == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)

    def read_into(
        self, block_ids: Sequence[int] | np.ndarray, dest: torch.Tensor | np.ndarray
    ) -> None:
        """Read blocks into ``dest``: block ``block_ids[i]`` lands at ``i * block_stride``."""
        pieces = [
            (view[i : i + READ_PIECE_BYTES], offset + i)
            for view, offset in self._runs(block_ids, dest, "dest")
            for i in range(0, len(view), READ_PIECE_BYTES)
        ]
        if len(pieces) == 1:
            reads = [_read_piece(self._fd, *pieces[0])]
        else:  # several reads in flight (preadv releases the GIL): the disk's queue fills
            reads = list(_read_pool().map(lambda piece: _read_piece(self._fd, *piece), pieces))
        for error, offset in reads:
            if error is not None:
                raise StorageError(f"reading {self.path} at {offset} failed: {error}") from error

    def write_from(
        self, block_ids: Sequence[int] | np.ndarray, src: torch.Tensor | np.ndarray
    ) -> None:
        """Write blocks from ``src``, laid out as ``read_into`` fills ``dest``."""
        for view, offset in self._runs(block_ids, src, "src"):
            try:
                _pwrite_all(self._fd, view, offset)
            except OSError as e:
                raise StorageError(f"writing {self.path} at {offset} failed: {e}") from e

    def _runs(
        self, block_ids: Sequence[int] | np.ndarray, buf: torch.Tensor | np.ndarray, what: str
    ) -> list[tuple[memoryview, int]]:
        """(slice of ``buf``, file offset) per run of ascending-adjacent block ids."""
        if self._fd < 0:
            raise StorageError(f"disk storage {self.path} is closed")
        ids = self.layout.block_id_array(block_ids)
        data = _byte_array(buf, what)
        stride = self.layout.block_stride
        if data.size < ids.size * stride:
            raise InvalidInput(
                f"{what} holds {data.size} bytes; {ids.size} blocks need {ids.size * stride}"
            )
        if self.direct and data.size and data.ctypes.data % DIRECT_IO_ALIGNMENT:
            raise InvalidInput(
                f"{what} at {data.ctypes.data:#x} is not {DIRECT_IO_ALIGNMENT}-byte aligned, "
                "which O_DIRECT needs; allocate it with staging_buffer()"
            )
        if ids.size == 0:
            return []
        starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)
        ends = np.append(starts[1:], ids.size)
        mv = data.data
        return [
            (mv[s * stride : e * stride], int(ids[s]) * stride)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]

    def close(self) -> None:
        """Close the file and delete it unless ``keep_file``."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        os.close(fd)
        if not self.keep_file:
            self.path.unlink(missing_ok=True)


def _read_piece(fd: int, view: memoryview, offset: int) -> tuple[OSError | None, int]:
    try:
        _pread_all(fd, view, offset)
    except OSError as e:
        return e, offset
    return None, offset


_pool_lock = threading.Lock()
_pools: list[ThreadPoolExecutor] = []


def _read_pool() -> ThreadPoolExecutor:
    """The process's disk read threads (``READ_THREADS``, one pool started on first use; idle
    threads cost nothing and are joined at interpreter exit)."""
    with _pool_lock:
        if not _pools:
            _pools.append(ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kvbm-disk-read"))
        return _pools[0]


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {offset + done}")
        done += n


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
