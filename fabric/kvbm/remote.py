"""Remote block sets: what a peer needs to read my blocks, and the plan that reads them.

The prefill side exports a ``RemoteBlockSet`` (``export_block_set``): its agent's name and
metadata, its layout, the base address of every layout buffer and the block ids on offer, under
a compatibility hash. It travels as versioned msgpack (``to_bytes`` / ``from_bytes``). The
decode side turns it into a pair of region lists (``plan_read``): reading them with its agent
(``fabric.pd.RemoteReader``), ``local_ids[i]`` receives ``remote.block_ids[i]``.

Planning, checked in this order: the compatibility hash (``ProtocolMismatch`` naming both),
then the block geometry (block size, layers, outer dim, inner dim, dtype; ``LayoutMismatch``
naming each differing field), then the ids. Two layouts of one geometry may still differ in kind
(fully contiguous vs layer separate) and alignment (padding between blocks):

* same kind: a block's bytes in each buffer form one *slot* on both sides, so regions are
  whole slots, buffer by buffer;
* different kinds: slots differ, so regions are per (block, layer, outer) *chunk*, the unit
  both layouts share (``chunk_bytes`` each, packed ``[token][inner]`` on both sides).

Either way the pairs are then merged where both sides are adjacent (``pair_coalesce``): runs of
ascending ids without padding become one region per buffer; fully contiguous <-> layer
separate becomes one region per (block, layer). Addresses are computed with numpy, never per
block in Python. The bytes of a block thus always land in the same (layer, outer, token)
position, never read as garbage from a layout the reader misunderstood.

Invariants: a ``RemoteBlockSet`` is immutable and validated on construction (buffers match the
layout, ids in range, one memory kind, not FILE); ``from_bytes(to_bytes(s)) == s``; the wire
carries the layout's strides and a reader whose layout arithmetic differs refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fabric.errors import InvalidInput, LayoutMismatch, ProtocolMismatch
from fabric.kvbm.core.layout import SUPPORTED_DTYPES, LayoutKind, LayoutSpec, dtype_name
from fabric.kvbm.tiers.storage import Storage
from fabric.transfer.agent import TransferAgent
from fabric.transfer.memory import MemoryKind, RegionList, pair_coalesce

REMOTE_BLOCK_SET_VERSION = 1
_U64 = 1 << 64
_DTYPES = {dtype_name(d): d for d in SUPPORTED_DTYPES}
_LAYOUT_INTS = ("num_blocks", "num_layers", "outer_dim", "block_size", "inner_dim", "alignment")


@dataclass(frozen=True, slots=True)
class RemoteBuffer:
    """One layout buffer of the exporting process, as its agent registered it."""

    address: int
    nbytes: int
    kind: MemoryKind
    device_id: int


@dataclass(frozen=True, slots=True)
class RemoteBlockSet:
    """Blocks a peer may read: where they live and how to reach them (module docstring)."""

    version: int
    agent_name: str
    agent_metadata: bytes
    layout: LayoutSpec
    buffers: tuple[RemoteBuffer, ...]
    block_ids: tuple[int, ...]
    compat_hash: int

    def __post_init__(self) -> None:
        if self.version != REMOTE_BLOCK_SET_VERSION:
            raise ProtocolMismatch(
                f"remote block set version {self.version}; this build speaks "
                f"{REMOTE_BLOCK_SET_VERSION} (upgrade the older side)"
            )
        if not isinstance(self.agent_name, str) or not self.agent_name:
            raise InvalidInput(f"agent_name={self.agent_name!r} must be a non-empty str")
        if not isinstance(self.agent_metadata, bytes) or not self.agent_metadata:
            raise InvalidInput("agent_metadata must be non-empty bytes")
        if type(self.compat_hash) is not int or not 0 <= self.compat_hash < _U64:
            raise InvalidInput(f"compat_hash={self.compat_hash!r} must be a uint64")
        layout = self.layout
        if len(self.buffers) != layout.num_buffers:
            raise LayoutMismatch(
                f"{len(self.buffers)} buffers for a {layout.kind.name} layout of "
                f"{layout.num_layers} layers, which has {layout.num_buffers}"
            )
        kinds = {b.kind for b in self.buffers}
        if len(kinds) != 1 or MemoryKind.FILE in kinds:
            names = sorted(k.name for k in kinds)
            raise InvalidInput(f"buffers must share one memory kind, DRAM or VRAM; got {names}")
        small = [i for i, b in enumerate(self.buffers) if b.nbytes < layout.buffer_bytes]
        if small:
            raise LayoutMismatch(
                f"buffer {small[0]} holds {self.buffers[small[0]].nbytes} bytes; the layout needs "
                f"{layout.buffer_bytes}"
            )
        layout.block_id_array(self.block_ids)

    @property
    def kind(self) -> MemoryKind:
        return self.buffers[0].kind

    def to_bytes(self) -> bytes:
        layout = self.layout
        packed: bytes = msgpack.packb(
            {
                "version": self.version,
                "agent_name": self.agent_name,
                "agent_metadata": self.agent_metadata,
                "layout": {
                    "kind": layout.kind.value,
                    **{name: getattr(layout, name) for name in _LAYOUT_INTS},
                    "dtype": dtype_name(layout.dtype),
                    "block_stride": layout.block_stride,
                    "chunk_bytes": layout.chunk_bytes,
                },
                "buffers": [[b.address, b.nbytes, b.kind.value, b.device_id] for b in self.buffers],
                "block_ids": np.asarray(self.block_ids, dtype="<i8").tobytes(),
                "compat_hash": self.compat_hash,
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> RemoteBlockSet:
        """Decode ``to_bytes`` output.

        Raises:
            ProtocolMismatch: another wire version, or layout strides this build computes
                differently.
            InvalidInput / LayoutMismatch: malformed or inconsistent content.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput(f"a remote block set is bytes, got {type(data).__name__}")
        try:
            msg = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise InvalidInput(f"remote block set is not valid msgpack: {e}") from e
        if not isinstance(msg, dict) or "version" not in msg:
            raise InvalidInput("remote block set must be a msgpack map with a version")
        if msg["version"] != REMOTE_BLOCK_SET_VERSION:
            raise ProtocolMismatch(
                f"remote block set version {msg['version']!r}; this build speaks "
                f"{REMOTE_BLOCK_SET_VERSION} (upgrade the older side)"
            )
        try:
            layout = _layout_from_wire(msg["layout"])
            buffers = tuple(
                RemoteBuffer(int(a), int(n), MemoryKind(k), int(d)) for a, n, k, d in msg["buffers"]
            )
            raw_ids = msg["block_ids"]
            if not isinstance(raw_ids, bytes) or len(raw_ids) % 8:
                raise InvalidInput("block_ids must be packed little-endian int64")
            block_ids = tuple(np.frombuffer(raw_ids, dtype="<i8").tolist())
            return cls(
                msg["version"],
                msg["agent_name"],
                msg["agent_metadata"],
                layout,
                buffers,
                block_ids,
                msg["compat_hash"],
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidInput | LayoutMismatch):
                raise
            raise InvalidInput(f"malformed remote block set: {type(e).__name__}: {e}") from e


def _layout_from_wire(facts: dict[str, Any]) -> LayoutSpec:
    dtype = _DTYPES.get(facts["dtype"])
    if dtype is None:
        raise LayoutMismatch(
            f"dtype {facts['dtype']!r} is not supported; use one of {sorted(_DTYPES)}"
        )
    layout = LayoutSpec(
        kind=LayoutKind(facts["kind"]),
        dtype=dtype,
        **{name: facts[name] for name in _LAYOUT_INTS},
    )
    sent = (facts["block_stride"], facts["chunk_bytes"])
    if sent != (layout.block_stride, layout.chunk_bytes):
        raise ProtocolMismatch(
            f"the sender computes block stride / chunk bytes {sent}, this build "
            f"{(layout.block_stride, layout.chunk_bytes)} for the same layout; versions differ"
        )
    return layout


def export_block_set(
    storage: Storage, block_ids: Sequence[int], agent: TransferAgent, compat_hash: int
) -> RemoteBlockSet:
    """Describe ``block_ids`` of ``storage`` for a peer to read through ``agent``.

    ``storage``'s buffers must already be registered with ``agent`` (register once, at start):
    the metadata taken here describes the registrations made so far.
    """
    if storage.kind is MemoryKind.FILE:
        raise InvalidInput("disk storage cannot be read by peers; offload to host memory first")
    ids = storage.layout.block_id_array(block_ids)
    buffers = tuple(
        RemoteBuffer(b.address, b.nbytes, b.kind, b.device_id) for b in storage.buffers()
    )
    return RemoteBlockSet(
        REMOTE_BLOCK_SET_VERSION,
        agent.name,
        agent.metadata(),
        storage.layout,
        buffers,
        tuple(ids.tolist()),
        compat_hash,
    )


def plan_read(
    local_storage: Storage,
    local_ids: Sequence[int],
    remote: RemoteBlockSet,
    *,
    compat_hash: int,
    layers: tuple[int, int] | None = None,
) -> tuple[RegionList, RegionList]:
    """Paired (local, remote) regions that copy ``remote.block_ids[i]`` into ``local_ids[i]``.

    Args:
        layers: ``(first, end)``: only layers ``first .. end - 1`` of each block (a layer-wise
            read of what a producer has written so far); None: every layer.

    Raises:
        ProtocolMismatch: ``remote.compat_hash != compat_hash``.
        LayoutMismatch: the block geometries differ (the message names every differing field).
        InvalidInput: ids out of range, counts differ, a repeated local id, an empty or
            out-of-range layer range, or disk storage.
    """
    if remote.compat_hash != compat_hash:
        raise ProtocolMismatch(
            f"remote block set from {remote.agent_name!r} has compatibility hash "
            f"{remote.compat_hash:#018x}, this worker's is {compat_hash:#018x}: the KV caches "
            "differ (model, dtype, layout or block size) and cannot be exchanged"
        )
    mine, theirs = local_storage.layout, remote.layout
    diff = mine.geometry_diff(theirs)
    if diff:
        details = ", ".join(f"{k}: local {a} vs remote {b}" for k, (a, b) in diff.items())
        raise LayoutMismatch(f"cannot read blocks of {remote.agent_name!r}: {details}")
    if local_storage.kind is MemoryKind.FILE:
        raise InvalidInput("cannot read remote blocks into disk storage; read into memory")
    local_arr = mine.block_id_array(local_ids)
    remote_arr = np.asarray(remote.block_ids, dtype=np.int64)
    if local_arr.size != remote_arr.size:
        raise InvalidInput(
            f"{local_arr.size} local ids for {remote_arr.size} remote blocks; they must pair up"
        )
    if local_arr.size and (np.diff(np.sort(local_arr)) == 0).any():
        raise InvalidInput("a local block id appears twice; each may be written once per read")
    first, end = (0, mine.num_layers) if layers is None else layers
    if not 0 <= first < end <= mine.num_layers:
        raise InvalidInput(f"layers {first}..{end - 1} asked for, the KV has {mine.num_layers}")
    local_bufs = local_storage.buffers()
    local_bases = np.array([b.address for b in local_bufs], dtype=np.int64)
    local_devs = np.array([b.device_id for b in local_bufs], dtype=np.int64)
    remote_bases = np.array([b.address for b in remote.buffers], dtype=np.int64)
    remote_devs = np.array([b.device_id for b in remote.buffers], dtype=np.int64)
    pieces = _slot_pieces if mine.kind is theirs.kind else _chunk_pieces
    span = (first, end)
    local_addr, local_dev, length = pieces(mine, local_bases, local_devs, local_arr, layers=span)
    remote_addr, remote_dev, _ = pieces(theirs, remote_bases, remote_devs, remote_arr, layers=span)
    return pair_coalesce(
        RegionList.build(local_storage.kind, local_addr, length, local_dev),
        RegionList.build(remote.kind, remote_addr, length, remote_dev),
    )


def _slot_pieces(
    layout: LayoutSpec,
    bases: np.ndarray,
    devs: np.ndarray,
    ids: np.ndarray,
    *,
    layers: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Address and device of every (buffer, block) piece of ``layers`` (first, end),
    buffer-major; and the piece length. Fully contiguous: the layers' run inside each block's
    slot (slots are ``[layer][outer]``); layer separate: the whole slots of those layers'
    buffers."""
    first, end = layers
    if layout.kind is LayoutKind.FULLY_CONTIGUOUS:
        layer_bytes = layout.outer_dim * layout.chunk_bytes
        bases, length = bases + first * layer_bytes, (end - first) * layer_bytes
    else:
        bases, devs, length = bases[first:end], devs[first:end], layout.slot_bytes
    addr = bases[:, None] + ids[None, :] * layout.block_stride
    dev = np.broadcast_to(devs[:, None], addr.shape)
    return addr.reshape(-1), dev.reshape(-1), length


def _chunk_pieces(
    layout: LayoutSpec,
    bases: np.ndarray,
    devs: np.ndarray,
    ids: np.ndarray,
    *,
    layers: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Address and device of every (block, layer, outer) chunk of ``layers`` (first, end),
    in that order; the chunk length."""
    locations = np.array(
        [
            layout.chunk_location(layer, outer)
            for layer in range(*layers)
            for outer in range(layout.outer_dim)
        ],
        dtype=np.int64,
    )
    buffer_index, chunk_index = locations[:, 0], locations[:, 1]
    offsets = bases[buffer_index] + chunk_index * layout.chunk_bytes
    addr = ids[:, None] * layout.block_stride + offsets[None, :]
    dev = np.broadcast_to(devs[buffer_index][None, :], addr.shape)
    return addr.reshape(-1), dev.reshape(-1), layout.chunk_bytes
