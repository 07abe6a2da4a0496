"""Low-level file I/O for the shared store: byte views of caller buffers, vectored reads and
writes at offset 0, exclusive creation, stamping and quiet removal.

Named ``file_io``, not ``io``, so it never reads as the standard library's module.

Invariants:

* No copies: ``byte_view`` and ``rows_view`` view the caller's memory (numpy array, CPU tensor
  or bytes-like buffer) or raise ``InvalidInput`` saying how to pass it; a tensor is viewed
  without this module importing torch.
* ``preadv_all`` and ``pwritev_all`` loop over short transfers: a read stops only when the views
  are full or the file ends, a write returns only when every byte is written (or raises
  ``OSError``).
* ``touch`` and ``unlink_quietly`` never raise: a file another instance removed first is not an
  error (``GONE`` covers NFS's ``ESTALE`` as well as ``ENOENT``).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from fabric.errors import InvalidInput

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

GONE = frozenset({errno.ENOENT, errno.ESTALE})  # unlinked by another instance (ESTALE: NFS)
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NO_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def byte_view(buf: Any, nbytes: int, what: str, *, writable: bool) -> memoryview:
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


def rows_view(out: Any, num_rows: int, row_bytes: int) -> memoryview:
    """A flat writable byte view of ``out``, checked to be rows of ``row_bytes``, ``num_rows``+."""
    shape = tuple(getattr(out, "shape", ()))
    if not shape or shape[0] < num_rows or getattr(out, "nbytes", None) != shape[0] * row_bytes:
        raise InvalidInput(
            f"out must be an array shaped [num_blocks, block_bytes] of uint8 with at least "
            f"{num_rows} rows of {row_bytes} bytes, got {type(out).__name__} {shape}"
        )
    return byte_view(out, shape[0] * row_bytes, "out", writable=True)


def preadv_all(fd: int, views: list[memoryview]) -> int:
    """Fill ``views`` from file offset 0 until they are full or the file ends; bytes read."""
    done = 0
    while views:
        n = os.preadv(fd, views, done)
        if n == 0:
            break
        done += n
        views = _advance(views, n)
    return done


def pwritev_all(fd: int, views: list[memoryview]) -> None:
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


def create_exclusive(path: str, directory: str) -> int:
    """Create ``path`` (which must not exist) for writing, making ``directory`` if missing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)  # first block of this fan-out directory
        return os.open(path, flags, 0o666)


def fsync_directory(directory: str) -> None:
    """Make the renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def touch(path: str, stamp_ns: int) -> bool:
    """Set the file's mtime (its recency for restarts and other instances); False if it is gone.

    Best effort otherwise: a file we may not stamp (another user's) keeps its mtime.
    """
    try:
        os.utime(path, ns=(stamp_ns, stamp_ns))
    except OSError as e:
        return e.errno not in GONE
    return True


def unlink_quietly(path: str) -> None:
    """Remove ``path``; a file already gone is fine, any other failure is logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("cannot remove %s (%s)", path, e)
