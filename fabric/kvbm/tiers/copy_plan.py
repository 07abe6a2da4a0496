"""What ``copy_blocks`` derives from a (source storage, target storage) pair alone, cached.

A ``PairPlan`` holds everything a copy between two memory storages needs that does not depend
on the block ids: the geometry check's verdict, how the sides are cut into buffer pairs, each
pair's flat byte buffers and row offsets, the strides, whether rows coalesce into runs, whether
both sides are on the CPU, and (built on first use) the integer word views of the index and
slice paths. Building it costs tens of microseconds of Python and torch view creation: as much
as copying a 16 KiB block, so a one-block onboard or offload reuses it.

Invariants: a plan is only returned for the very storage objects it was built from, holding
the very layout and tensor list objects it saw: the cache is keyed by object identity and each
hit is checked against weak references to both storages (a dead or different object, e.g. an
``id`` reused after garbage collection, is a miss) and against the sides' current ``layout``
and ``tensors`` (a storage whose tensors were replaced or dropped by ``close`` gets a new
plan). The cache holds at most ``MAX_PLANS`` plans and never keeps a storage alive (the views it
keeps alias the storages' tensors, so a plan is dropped with its pair, least recently used
first). Safe across threads: a lookup and an insert are each one dict operation under a lock.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections import OrderedDict
from typing import Protocol

import torch

from fabric.errors import LayoutMismatch
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec

MAX_PLANS = 64
"""Plans kept; a process copies between a handful of storages (tiers, engine pages, staging)."""

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


class MemorySide(Protocol):
    """What a plan needs of a memory storage (a ``TensorStorage``)."""

    layout: LayoutSpec
    tensors: list[torch.Tensor]


@dataclasses.dataclass(slots=True)
class PairPlan:
    """The id-independent facts of copies from ``src_layout``/``src_tensors`` to ``dst_*``."""

    src_layout: LayoutSpec
    dst_layout: LayoutSpec
    src_tensors: list[torch.Tensor]
    dst_tensors: list[torch.Tensor]
    num_pairs: int
    """Buffer pairs: 1 when both sides are fully contiguous, else one per layer."""
    on_cpu: bool
    src_stride: int
    dst_stride: int
    row_bytes: int
    """Bytes of one block inside one buffer pair."""
    whole_runs: bool
    """Both strides equal ``row_bytes``: a run of adjacent blocks is one chunk per pair."""
    src_rows: list[tuple[torch.Tensor, int]]
    """Per buffer pair: the source buffer as flat bytes, and the pair's offset inside a slot."""
    dst_rows: list[tuple[torch.Tensor, int]]
    _views: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def word_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per buffer pair, ``(num_blocks, chunks, words)`` views of both sides (aliasing)."""
        if self._views is None:
            word = _word_size(
                (self.src_layout, self.src_tensors), (self.dst_layout, self.dst_tensors)
            )
            src = [_word_view(self.src_layout, t, word) for t in self.src_tensors]
            dst = [_word_view(self.dst_layout, t, word) for t in self.dst_tensors]
            self._views = (
                _split(self.src_layout, src, self.dst_layout),
                _split(self.dst_layout, dst, self.src_layout),
            )
        return self._views


@dataclasses.dataclass(slots=True)
class _Entry:
    src: weakref.ref[object]
    dst: weakref.ref[object]
    plan: PairPlan


_lock = threading.RLock()  # re-entrant: a weakref callback may run inside a locked section
_plans: OrderedDict[tuple[int, int], _Entry] = OrderedDict()


def pair_plan(src: MemorySide, dst: MemorySide) -> PairPlan:
    """The plan for copies from ``src`` to ``dst`` (cached; see the module docstring).

    Raises:
        LayoutMismatch: the layouts differ in block size, layers, outer dim, inner dim or dtype.
    """
    key = (id(src), id(dst))
    with _lock:
        entry = _plans.get(key)
        if entry is not None:
            _plans.move_to_end(key)
    if entry is not None and _fits(entry, src, dst):
        return entry.plan
    plan = build_plan(src.layout, src.tensors, dst.layout, dst.tensors)
    try:
        entry = _Entry(weakref.ref(src, _drop_dead), weakref.ref(dst, _drop_dead), plan)
    except TypeError:  # an object without weak references: never cached
        return plan
    with _lock:
        _plans[key] = entry
        while len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
    return plan


def forget(storage: object) -> None:
    """Drop every plan involving ``storage`` (its ``close`` calls this: a plan's views would
    keep its memory, e.g. a shared segment, exported)."""
    with _lock:
        for key in [k for k, e in _plans.items() if storage is e.src() or storage is e.dst()]:
            del _plans[key]


def _drop_dead(_: weakref.ref[object]) -> None:
    """Weakref callback: drop the plans of a storage that was garbage collected."""
    with _lock:
        for key in [k for k, e in _plans.items() if e.src() is None or e.dst() is None]:
            del _plans[key]


def _fits(entry: _Entry, src: MemorySide, dst: MemorySide) -> bool:
    plan = entry.plan
    return (
        entry.src() is src
        and entry.dst() is dst
        and plan.src_layout is src.layout
        and plan.dst_layout is dst.layout
        and plan.src_tensors is src.tensors
        and plan.dst_tensors is dst.tensors
    )


def build_plan(
    src_layout: LayoutSpec,
    src_tensors: list[torch.Tensor],
    dst_layout: LayoutSpec,
    dst_tensors: list[torch.Tensor],
) -> PairPlan:
    """A plan for these exact layouts and tensors (uncached).

    Raises:
        LayoutMismatch: the layouts differ in geometry.
    """
    diff = src_layout.geometry_diff(dst_layout)
    if diff:
        details = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
        raise LayoutMismatch(f"cannot copy blocks between layouts that differ in {details}")
    both = both_contiguous(src_layout, dst_layout)
    src_rows = _byte_rows(src_layout, src_tensors, both)
    dst_rows = _byte_rows(dst_layout, dst_tensors, both)
    row_bytes = src_layout.block_bytes // len(src_rows)
    return PairPlan(
        src_layout=src_layout,
        dst_layout=dst_layout,
        src_tensors=src_tensors,
        dst_tensors=dst_tensors,
        num_pairs=1 if both else src_layout.num_layers,
        on_cpu=all(t.device.type == "cpu" for t in (*src_tensors, *dst_tensors)),
        src_stride=src_layout.block_stride,
        dst_stride=dst_layout.block_stride,
        row_bytes=row_bytes,
        whole_runs=src_layout.block_stride == dst_layout.block_stride == row_bytes,
        src_rows=src_rows,
        dst_rows=dst_rows,
    )


def both_contiguous(a: LayoutSpec, b: LayoutSpec) -> bool:
    return a.kind is b.kind is LayoutKind.FULLY_CONTIGUOUS


def _byte_rows(
    layout: LayoutSpec, tensors: list[torch.Tensor], both: bool
) -> list[tuple[torch.Tensor, int]]:
    """Per buffer pair (cut as ``_split`` cuts): the buffer as flat bytes, and the offset of the
    pair's row inside each slot."""
    flats = [t.reshape(-1).view(torch.uint8) for t in tensors]
    if both or layout.kind is LayoutKind.LAYER_SEPARATE:
        return [(flat, 0) for flat in flats]
    (flat,) = flats
    layer_bytes = layout.outer_dim * layout.chunk_bytes
    return [(flat, layer * layer_bytes) for layer in range(layout.num_layers)]


def _word_size(*sides: tuple[LayoutSpec, list[torch.Tensor]]) -> int:
    """Widest power-of-two word (<= 8 bytes) dividing every chunk, stride and buffer address."""
    g = 0
    for layout, tensors in sides:
        g = math.gcd(g, layout.chunk_bytes, layout.block_stride)
        for t in tensors:
            g = math.gcd(g, t.data_ptr())
    return min(8, g & -g)


def _word_view(layout: LayoutSpec, buffer: torch.Tensor, word: int) -> torch.Tensor:
    """``buffer`` as ``(num_blocks, chunks_per_slot, chunk_words)`` integer words (aliasing)."""
    words = buffer.reshape(-1).view(torch.uint8).view(_WORD_DTYPES[word])
    return words.as_strided(
        (layout.num_blocks, layout.chunks_per_slot, layout.chunk_bytes // word),
        (layout.block_stride // word, layout.chunk_bytes // word, 1),
        words.storage_offset(),
    )


def _split(layout: LayoutSpec, views: list[torch.Tensor], other: LayoutSpec) -> list[torch.Tensor]:
    """One view per layer unless both sides are fully contiguous (then the one whole view)."""
    if both_contiguous(layout, other) or layout.kind is LayoutKind.LAYER_SEPARATE:
        return views
    (view,) = views
    return list(torch.split(view, layout.outer_dim, dim=1))
