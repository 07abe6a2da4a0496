"""Block layouts: where each KV block's bytes live inside a pool's buffers.

A ``LayoutSpec`` owns the geometry of one pool and the arithmetic from block ids to bytes. It
allocates nothing; storages (``storage.py``) allocate or adopt buffers that satisfy it and the
copy engine (``copy.py``) and descriptor builders read it.

Vocabulary:

* **chunk**: one (block, layer, outer) piece, ``block_size * inner_dim`` elements, stored as
  ``[token][inner]``. ``outer`` is K/V (``outer_dim=2``) or a single opaque page (``outer_dim=1``).
* **slot**: the bytes of one block inside one buffer: every chunk of the block for
  ``FULLY_CONTIGUOUS`` (order ``[layer][outer]``), the ``outer_dim`` chunks of one layer for
  ``LAYER_SEPARATE``. Chunks inside a slot are packed with no gap.
* **block stride**: distance between consecutive slots of one buffer: ``slot_bytes`` rounded up to
  ``alignment``. ``FULLY_CONTIGUOUS`` has one buffer (block ``b`` at ``b * block_stride``);
  ``LAYER_SEPARATE`` has ``num_layers`` buffers (block ``b`` of layer ``l`` at ``b * block_stride``
  in buffer ``l``).

Buffers as tensors (``tensor_shapes``): without padding a buffer is a contiguous tensor of
``dtype`` shaped ``(num_blocks, num_layers, outer_dim, block_size, inner_dim)`` (fully contiguous)
or ``(num_blocks, outer_dim, block_size, inner_dim)`` (layer separate). With padding
(``block_stride > slot_bytes``) it is a ``(num_blocks, block_stride // itemsize)`` tensor of
``dtype`` whose rows start with the slot and end in padding; ``chunk_view`` gives the strided
``(num_blocks, chunks_per_slot, chunk_elems)`` view either way. The stride is always a whole number
of elements (alignment and itemsize are both powers of two).

Invariants: specs are immutable and validated on construction; offsets and alignment are relative
to the buffer start, and storages place buffer starts on ``alignment`` as well; ``regions`` never
covers padding, never reorders the requested blocks and only merges ascending-adjacent blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from fabric.discovery.records import FabricLayout
from fabric.errors import InvalidInput, LayoutMismatch

SUPPORTED_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int8,
        torch.uint8,
    }
)


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype (``"float16"``), as used in compatibility facts."""
    return str(dtype).removeprefix("torch.")


def layout_record(layout: LayoutSpec, *, model: str, model_path: str | None = None) -> FabricLayout:
    """``layout``'s facts as a discovery record gives them (``FabricLayout``): what peers compare
    before a transfer, and the pool's size."""
    return FabricLayout(
        model=model,
        model_path=model_path,
        block_size=layout.block_size,
        num_layers=layout.num_layers,
        outer_dim=layout.outer_dim,
        inner_dim=layout.inner_dim,
        dtype=dtype_name(layout.dtype),
        kind=layout.kind.value,
        num_blocks=layout.num_blocks,
    )


class LayoutKind(Enum):
    """How a pool's blocks are spread over buffers."""

    FULLY_CONTIGUOUS = "fully_contiguous"
    LAYER_SEPARATE = "layer_separate"


@dataclass(frozen=True, slots=True)
class Region:
    """A byte range inside buffer ``buffer_index`` of a storage."""

    buffer_index: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class LayoutSpec:
    """The geometry of one pool's KV blocks (see the module docstring for the terms)."""

    kind: LayoutKind
    num_blocks: int
    num_layers: int
    outer_dim: int
    block_size: int
    inner_dim: int
    dtype: torch.dtype
    alignment: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.kind, LayoutKind):
            raise InvalidInput(
                f"kind={self.kind!r} is not a LayoutKind; use one of {[k.name for k in LayoutKind]}"
            )
        for name in ("num_blocks", "num_layers", "block_size", "inner_dim", "alignment"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"{name}={value!r} must be a positive int")
        if self.outer_dim not in (1, 2) or isinstance(self.outer_dim, bool):
            raise LayoutMismatch(
                f"outer_dim={self.outer_dim!r} is not allowed; use 2 (K and V stored separately) "
                "or 1 (one joined page per layer)"
            )
        if self.alignment & (self.alignment - 1):
            raise InvalidInput(f"alignment={self.alignment} must be a power of two (bytes)")
        if self.dtype not in SUPPORTED_DTYPES:
            allowed = sorted(dtype_name(d) for d in SUPPORTED_DTYPES)
            raise LayoutMismatch(f"dtype={self.dtype!r} is not supported; use one of {allowed}")

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def chunk_elems(self) -> int:
        """Elements of one (block, layer, outer) chunk."""
        return self.block_size * self.inner_dim

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_elems * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers and outers, without padding."""
        return self.num_layers * self.outer_dim * self.chunk_bytes

    @property
    def num_buffers(self) -> int:
        return 1 if self.kind is LayoutKind.FULLY_CONTIGUOUS else self.num_layers

    @property
    def chunks_per_slot(self) -> int:
        """Chunks of one block inside one buffer."""
        if self.kind is LayoutKind.FULLY_CONTIGUOUS:
            return self.num_layers * self.outer_dim
        return self.outer_dim

    @property
    def slot_bytes(self) -> int:
        """Bytes of one block inside one buffer, without padding."""
        return self.chunks_per_slot * self.chunk_bytes

    @property
    def block_stride(self) -> int:
        """Bytes between the starts of consecutive blocks in one buffer (slot plus padding)."""
        return -(-self.slot_bytes // self.alignment) * self.alignment

    @property
    def padded(self) -> bool:
        return self.block_stride != self.slot_bytes

    @property
    def buffer_bytes(self) -> int:
        """Bytes of each buffer, padding included."""
        return self.num_blocks * self.block_stride

    @property
    def total_bytes(self) -> int:
        return self.num_buffers * self.buffer_bytes

    # ---- buffers as tensors ------------------------------------------------------------------

    def tensor_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each buffer as a contiguous tensor of ``dtype`` (one entry per buffer)."""
        if self.padded:
            shape: tuple[int, ...] = (self.num_blocks, self.block_stride // self.itemsize)
        elif self.kind is LayoutKind.FULLY_CONTIGUOUS:
            shape = (self.num_blocks, self.num_layers, self.outer_dim, *self._chunk_shape)
        else:
            shape = (self.num_blocks, self.outer_dim, *self._chunk_shape)
        return [shape] * self.num_buffers

    @property
    def _chunk_shape(self) -> tuple[int, int]:
        return (self.block_size, self.inner_dim)

    def check_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Raise ``LayoutMismatch`` unless ``tensors`` can serve as this layout's buffers.

        Accepted: ``num_buffers`` contiguous tensors of ``dtype``, each of ``buffer_bytes`` bytes
        with blocks as the outermost dimension (``shape[0] == num_blocks``) and its start aligned
        to ``alignment``. Inner dimensions may be shaped freely (an engine's
        ``[num_blocks, heads, block_size, head_size]`` page is fine) since blocks are moved as
        bytes.
        """
        if len(tensors) != self.num_buffers:
            raise LayoutMismatch(
                f"got {len(tensors)} tensors; a {self.kind.name} layout with "
                f"{self.num_layers} layers needs {self.num_buffers}"
            )
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise LayoutMismatch(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
            if t.dtype != self.dtype:
                raise LayoutMismatch(
                    f"tensor {i} has dtype {t.dtype}; the layout needs {self.dtype}"
                )
            if not t.is_contiguous():
                raise LayoutMismatch(f"tensor {i} (shape {tuple(t.shape)}) is not contiguous")
            nbytes = t.numel() * t.element_size()
            if t.dim() == 0 or t.shape[0] != self.num_blocks or nbytes != self.buffer_bytes:
                raise LayoutMismatch(
                    f"tensor {i} has shape {tuple(t.shape)} ({nbytes} bytes); the layout needs "
                    f"{self.num_blocks} blocks outermost and {self.buffer_bytes} bytes, e.g. "
                    f"shape {self.tensor_shapes()[0]}"
                )
            if t.data_ptr() % self.alignment:
                raise LayoutMismatch(
                    f"tensor {i} starts at {t.data_ptr():#x}, not a multiple of "
                    f"alignment={self.alignment}"
                )

    def chunk_view(self, buffer: torch.Tensor) -> torch.Tensor:
        """View one buffer as ``(num_blocks, chunks_per_slot, chunk_elems)`` (padding skipped).

        ``buffer`` must satisfy ``check_tensors`` (or be a ``dtype`` buffer of ``buffer_bytes``).
        The view aliases the buffer; it is not contiguous when the layout is padded.
        """
        flat = buffer.reshape(-1)
        return flat.as_strided(
            (self.num_blocks, self.chunks_per_slot, self.chunk_elems),
            (self.block_stride // self.itemsize, self.chunk_elems, 1),
            flat.storage_offset(),
        )

    def chunk_location(self, layer: int, outer: int) -> tuple[int, int]:
        """``(buffer_index, chunk index inside the slot)`` of a block's (layer, outer) chunk."""
        if not 0 <= layer < self.num_layers or not 0 <= outer < self.outer_dim:
            raise InvalidInput(
                f"(layer={layer}, outer={outer}) is out of range; layers 0..{self.num_layers - 1}, "
                f"outer 0..{self.outer_dim - 1}"
            )
        if self.kind is LayoutKind.FULLY_CONTIGUOUS:
            return 0, layer * self.outer_dim + outer
        return layer, outer

    # ---- block ids to byte ranges ------------------------------------------------------------

    def block_id_array(self, block_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """``block_ids`` as an int64 array, checked to lie in ``0 .. num_blocks-1``."""
        ids = np.asarray(block_ids)
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidInput(
                f"block ids must be a flat sequence of ints, got dtype {ids.dtype} "
                f"shape {ids.shape}"
            )
        ids = ids.astype(np.int64, copy=False)
        bad = (ids < 0) | (ids >= self.num_blocks)
        if bad.any():
            raise InvalidInput(
                f"block id {int(ids[bad][0])} is out of range; this pool has blocks "
                f"0..{self.num_blocks - 1}"
            )
        return ids

    def region_array(self, block_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The regions of ``block_ids`` as an ``(n, 3)`` int64 array of (buffer, offset, length).

        Order: buffer-major (all of buffer 0, then buffer 1, ...), and inside a buffer the order of
        ``block_ids``. Runs of ascending-adjacent ids (``3, 4, 5``) merge into one region when the
        layout has no padding; padded layouts give one region per block (padding is never
        included). A descending or repeated id starts a new region.
        """
        ids = self.block_id_array(block_ids)
        if ids.size == 0:
            return np.zeros((0, 3), dtype=np.int64)
        if self.padded:
            starts = np.arange(ids.size)
        else:
            starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)
        run_lengths = np.diff(starts, append=ids.size)
        offsets = ids[starts] * self.block_stride
        lengths = run_lengths * self.slot_bytes
        num_runs = starts.size
        out = np.empty((self.num_buffers * num_runs, 3), dtype=np.int64)
        out[:, 0] = np.repeat(np.arange(self.num_buffers), num_runs)
        out[:, 1] = np.tile(offsets, self.num_buffers)
        out[:, 2] = np.tile(lengths, self.num_buffers)
        return out

    def regions(self, block_ids: Sequence[int] | np.ndarray) -> list[Region]:
        """The byte ranges holding ``block_ids``, coalesced as ``region_array`` describes."""
        return [Region(b, o, n) for b, o, n in self.region_array(block_ids).tolist()]

    # ---- compatibility -----------------------------------------------------------------------

    def compat_fields(self) -> dict[str, int | str]:
        """The facts two peers must share to exchange blocks (not num_blocks, kind or alignment)."""
        return {
            "block_size": self.block_size,
            "num_layers": self.num_layers,
            "outer_dim": self.outer_dim,
            "inner_dim": self.inner_dim,
            "dtype": dtype_name(self.dtype),
        }

    def geometry_diff(self, other: LayoutSpec) -> dict[str, tuple[int | str, int | str]]:
        """``{field: (mine, theirs)}`` for every compatibility fact that differs."""
        mine, theirs = self.compat_fields(), other.compat_fields()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}

    def same_geometry(self, other: LayoutSpec) -> bool:
        """Whether blocks of ``other`` can be copied into this layout (and back) byte for byte."""
        return not self.geometry_diff(other)


@dataclass(frozen=True, slots=True)
class KvGeometry:
    """What the model's KV cache looks like per token; with the config it fixes every layout."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype = torch.float16
    kv_split: bool = True
    """K and V in separate chunks (outer dim 2); False for one joined page per layer."""

    def layout(self, kind: LayoutKind, num_blocks: int, block_size: int) -> LayoutSpec:
        return LayoutSpec(
            kind=kind,
            num_blocks=num_blocks,
            num_layers=self.num_layers,
            outer_dim=2 if self.kv_split else 1,
            block_size=block_size,
            inner_dim=self.num_kv_heads * self.head_size * (1 if self.kv_split else 2),
            dtype=self.dtype,
        )
