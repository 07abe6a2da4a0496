"""Memory regions as transfer agents see them: buffers to register and region lists to move.

* ``MemoryKind`` / ``BufferInfo``: one buffer a transfer agent registers (DRAM, VRAM or a file).
* ``RegionList``: many byte ranges of one memory kind as three parallel int64 arrays (address,
  length, device id), built and merged with numpy, never one Python object per region. A
  NIXL descriptor costs about 5 us to post here, so fewer, longer regions are faster:
  ``coalesce`` merges address-adjacent runs of one list; ``pair_coalesce`` merges a local and a
  remote list only where *both* sides are adjacent, since a READ or WRITE moves ``local[i]`` to or
  from ``remote[i]`` and needs the two lists to stay equal in count and pairwise in length.

Invariants: a ``RegionList`` is immutable (its arrays are read-only), every length is positive,
addresses and device ids are non-negative, and merging never reorders regions or changes which
bytes are covered (nor, for ``pair_coalesce``, which local byte pairs with which remote byte).
For files, ``address`` is the offset in the file and ``device_id`` the open file descriptor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from fabric.errors import InvalidInput


class MemoryKind(Enum):
    """The memory type a transfer agent registers a buffer as (NIXL's DRAM / VRAM / FILE)."""

    DRAM = "DRAM"
    VRAM = "VRAM"
    FILE = "FILE"


@dataclass(frozen=True, slots=True)
class BufferInfo:
    """What a transfer agent needs to register one buffer.

    Memory: ``address`` is the raw pointer, ``device_id`` the CUDA device index (0 for DRAM) and
    ``path`` is None. File: ``address`` is the byte offset of the buffer in the file (0),
    ``device_id`` the open file descriptor (NIXL's FILE descriptors take the fd there) and ``path``
    the file's path.
    """

    address: int
    nbytes: int
    kind: MemoryKind
    device_id: int
    path: str | None


ArrayLike = Sequence[int] | np.ndarray | int


@dataclass(frozen=True, slots=True, eq=False)
class RegionList:
    """Byte ranges ``[addresses[i], addresses[i] + lengths[i])`` on ``device_ids[i]``, one kind.

    Build with ``RegionList.build`` (validates, broadcasts scalars, freezes the arrays).
    """

    kind: MemoryKind
    addresses: np.ndarray
    lengths: np.ndarray
    device_ids: np.ndarray

    @classmethod
    def build(
        cls,
        kind: MemoryKind,
        addresses: ArrayLike,
        lengths: ArrayLike,
        device_ids: ArrayLike = 0,
    ) -> RegionList:
        """A region list from arrays (or scalars broadcast to the addresses' length).

        Raises:
            InvalidInput: not a ``MemoryKind``, arrays that are not flat integers of one length,
                a length <= 0, or a negative address or device id.
        """
        if not isinstance(kind, MemoryKind):
            raise InvalidInput(f"kind={kind!r} is not a MemoryKind")
        addr = np.atleast_1d(_int_array(addresses, "addresses"))
        count = addr.size
        try:
            lens = np.broadcast_to(_int_array(lengths, "lengths"), (count,)).copy()
            devs = np.broadcast_to(_int_array(device_ids, "device_ids"), (count,)).copy()
        except ValueError as e:
            raise InvalidInput(f"{count} addresses but lengths/device ids of another size") from e
        if count and (lens <= 0).any():
            raise InvalidInput(f"region length {int(lens[lens <= 0][0])} must be positive")
        if count and ((addr < 0).any() or (devs < 0).any()):
            raise InvalidInput("region addresses and device ids must be non-negative")
        for a in (addr, lens, devs):
            a.setflags(write=False)
        return cls(kind, addr, lens, devs)

    @classmethod
    def from_buffers(cls, buffers: Sequence[BufferInfo]) -> RegionList:
        """One region per whole buffer (all buffers must share one kind)."""
        kinds = {b.kind for b in buffers}
        if len(kinds) != 1:
            names = sorted(k.name for k in kinds)
            raise InvalidInput(f"buffers must share one memory kind, got {names}")
        return cls.build(
            kinds.pop(),
            [b.address for b in buffers],
            [b.nbytes for b in buffers],
            [b.device_id for b in buffers],
        )

    def __len__(self) -> int:
        return int(self.addresses.size)

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    def descs(self) -> np.ndarray:
        """The ``(n, 3)`` uint64 array of (address, length, device id) NIXL takes."""
        return np.stack([self.addresses, self.lengths, self.device_ids], axis=1).astype(np.uint64)

    def coalesce(self) -> RegionList:
        """Merge runs where a region starts at the previous one's end on the same device."""
        if len(self) < 2:
            return self
        return self._merged(self._breaks())

    def _breaks(self) -> np.ndarray:
        """``True`` at every index where a new merged region must start (index 0 always)."""
        brk = np.ones(len(self), dtype=bool)
        ends = self.addresses[:-1] + self.lengths[:-1]
        brk[1:] = (self.addresses[1:] != ends) | (self.device_ids[1:] != self.device_ids[:-1])
        return brk

    def _merged(self, brk: np.ndarray) -> RegionList:
        starts = np.flatnonzero(brk)
        if starts.size == len(self):
            return self
        return RegionList.build(
            self.kind,
            self.addresses[starts],
            np.add.reduceat(self.lengths, starts),
            self.device_ids[starts],
        )


def pair_coalesce(local: RegionList, remote: RegionList) -> tuple[RegionList, RegionList]:
    """Merge ``local[i]``/``remote[i]`` into the previous pair where both sides are adjacent.

    Raises:
        InvalidInput: the lists differ in count or in the length of some pair.
    """
    check_pairs(local, remote)
    if len(local) < 2:
        return local, remote
    brk = local._breaks() | remote._breaks()
    return local._merged(brk), remote._merged(brk)


def check_pairs(local: RegionList, remote: RegionList) -> None:
    """Raise ``InvalidInput`` unless the lists pair up (equal counts, equal lengths pairwise)."""
    if len(local) != len(remote):
        raise InvalidInput(
            f"{len(local)} local regions vs {len(remote)} remote regions; they must pair up"
        )
    if not np.array_equal(local.lengths, remote.lengths):
        i = int(np.flatnonzero(local.lengths != remote.lengths)[0])
        raise InvalidInput(
            f"region pair {i} differs in length: local {int(local.lengths[i])} vs remote "
            f"{int(remote.lengths[i])} bytes"
        )


def _int_array(values: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim > 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInput(f"{what} must be a flat sequence of ints, got {arr.dtype} {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 1 << 63:
        raise InvalidInput(f"{what} holds a value >= 2**63")
    return arr.astype(np.int64)
