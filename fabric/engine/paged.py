"""Paged KV: per-layer K and V views over the KVBM's device storage, and batch index tensors.

The engine's KV cache *is* the KVBM device pool: ``PagedKv`` holds, for each layer, a K view and
a V view shaped ``(num_blocks, block_size, inner_dim)`` that alias the storage's buffers through
``LayoutSpec.chunk_view`` (outer index 0 is K, 1 is V; ``inner_dim = num_kv_heads * head_size``,
heads-major). It works for every layout kind and padding, because the views carry the layout's
strides; nothing is copied into a private cache.

A ``PagedBatch`` is the index arithmetic of one forward call, built once and shared by every
layer. Its new tokens are packed on one axis (``N`` tokens of every sequence, in order): where
each token's K/V goes (``write_blocks``, ``write_offsets``), its position, and each sequence's
last token (``last_rows``, whose logits the call returns). Its ``groups`` split the packed axis
into runs of sequences that attend together: ``num_seqs`` sequences of ``num_queries`` tokens
each, with the blocks each attends over (``tables``, padded with block 0 and masked) and an
additive mask. A decode step is one group (one query per sequence); a prefill chunk is a group
of one sequence; ``pack`` joins batches into one call (a step mixing decodes and prefill chunks
shares every projection and MLP, while attention runs per group). Writes are one ``index_put_``
per layer and tensor; reads are one ``index_select`` per layer, tensor and group. No Python
loop runs per block or per token.

Invariants: a group's queries are never padded; keys beyond a query's position are masked
(``-inf`` in the additive mask, in the pool's dtype: the fused CPU attention kernel takes it
as is, a boolean mask costs a conversion per layer); ``tables is None`` only for a prefill
chunk from position 0, where attention uses the fresh K/V with a causal mask instead of reading
them back. A chunk that starts inside a block reads that block's earlier positions from the
pool (written by the previous chunk) and writes its own after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fabric.errors import InvalidInput, LayoutMismatch
from fabric.kvbm import TensorStorage


class PagedKv:
    """K and V views of every layer over one ``TensorStorage`` with ``outer_dim == 2``."""

    def __init__(self, storage: TensorStorage) -> None:
        layout = storage.layout
        if layout.outer_dim != 2:
            raise LayoutMismatch(
                "the engine needs K and V in separate chunks (KvGeometry kv_split=True, "
                f"outer_dim=2); this pool has outer_dim={layout.outer_dim}"
            )
        self.layout = layout
        self.block_size = layout.block_size
        self.device = storage.tensors[0].device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in range(layout.num_layers):
            for outer, views in ((0, self.keys), (1, self.values)):
                buffer_index, chunk = layout.chunk_location(layer, outer)
                chunks = layout.chunk_view(storage.tensors[buffer_index])
                views.append(chunks[:, chunk].view(-1, layout.block_size, layout.inner_dim))
        self.dtype = self.keys[0].dtype

    def write(self, layer: int, batch: PagedBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k`` and ``v`` (``(num_new_tokens, inner_dim)``) at the batch's write slots."""
        slots = (batch.write_blocks, batch.write_offsets)
        self.keys[layer].index_put_(slots, k)
        self.values[layer].index_put_(slots, v)

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks in ``tables`` (``(B, n)``) as ``(B, n * block_size, inner)``.

        ``index_select`` copies whole ``(block_size, inner)`` pages; about twice as fast on CPU as
        advanced indexing of the strided views.
        """
        flat = tables.flatten()
        shape = (tables.shape[0], -1, self.layout.inner_dim)
        keys = torch.index_select(self.keys[layer], 0, flat).view(shape)
        return keys, torch.index_select(self.values[layer], 0, flat).view(shape)


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """``num_seqs`` sequences of ``num_queries`` new tokens each, contiguous in the packed axis,
    whose queries attend together (see the module docstring)."""

    num_seqs: int
    num_queries: int
    tables: torch.Tensor | None  # (num_seqs, n) int64 blocks to attend over; None: fresh K/V
    mask: torch.Tensor | None  # (num_seqs, 1, num_queries, n * block_size): 0 or -inf

    @property
    def num_tokens(self) -> int:
        return self.num_seqs * self.num_queries


@dataclass(frozen=True, slots=True)
class PagedBatch:
    """The index tensors of one forward call (see the module docstring)."""

    positions: torch.Tensor  # (N,) int64
    write_blocks: torch.Tensor  # (N,) int64 block id per new token
    write_offsets: torch.Tensor  # (N,) int64 slot inside that block
    last_rows: torch.Tensor  # (num_seqs,) int64 packed index of each sequence's last token
    groups: tuple[AttentionGroup, ...]

    @property
    def num_tokens(self) -> int:
        return self.write_blocks.numel()


def pack(batches: Sequence[PagedBatch]) -> PagedBatch:
    """One forward call over the tokens of ``batches``, in order (each keeps its groups)."""
    if len(batches) == 1:
        return batches[0]
    if not batches:
        raise InvalidInput("a forward call needs at least one sequence")
    offsets, total = [], 0
    for batch in batches:
        offsets.append(total)
        total += batch.num_tokens
    return PagedBatch(
        torch.cat([b.positions for b in batches]),
        torch.cat([b.write_blocks for b in batches]),
        torch.cat([b.write_offsets for b in batches]),
        torch.cat([b.last_rows + o for b, o in zip(batches, offsets, strict=True)]),
        tuple(g for b in batches for g in b.groups),
    )


def _table_tensor(kv: PagedKv, tables: Sequence[Sequence[int]], num_blocks: int) -> torch.Tensor:
    """``(B, num_blocks)`` int64 tensor of the first ``num_blocks`` of each table, padded with 0."""
    out = torch.zeros(len(tables), num_blocks, dtype=torch.int64)
    for row, table in enumerate(tables):
        ids = kv.layout.block_id_array(table[:num_blocks])  # range-checked
        out[row, : ids.size] = torch.from_numpy(ids)
    return out.to(kv.device)


def _check_capacity(table: Sequence[int], last_position: int, block_size: int) -> None:
    needed = last_position // block_size + 1
    if len(table) < needed:
        raise InvalidInput(
            f"block table has {len(table)} blocks of {block_size} tokens; position "
            f"{last_position} needs {needed}"
        )


def _additive_mask(kv: PagedKv, positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``(B, Q, num_keys)``: 0 where key position <= the query's position, else -inf."""
    keys = torch.arange(num_keys, device=kv.device)
    visible = keys[None, None, :] <= positions[:, :, None]
    mask = torch.zeros(visible.shape, dtype=kv.dtype, device=kv.device)
    return mask.masked_fill_(~visible, float("-inf"))


def prefill_batch(
    kv: PagedKv, block_table: Sequence[int], num_computed: int, num_tokens: int
) -> PagedBatch:
    """One sequence: compute positions ``num_computed .. num_tokens - 1``, attend from 0."""
    if not 0 <= num_computed < num_tokens:
        raise InvalidInput(
            f"num_computed={num_computed} must be in 0..{num_tokens - 1} for {num_tokens} tokens"
        )
    bs = kv.block_size
    _check_capacity(block_table, num_tokens - 1, bs)
    num_blocks = (num_tokens - 1) // bs + 1
    table = _table_tensor(kv, [block_table], num_blocks)
    positions = torch.arange(num_computed, num_tokens, device=kv.device)
    write_blocks = table[0, positions // bs]
    last = torch.tensor([positions.numel() - 1], dtype=torch.int64, device=kv.device)
    if num_computed == 0:
        group = AttentionGroup(1, positions.numel(), None, None)
    else:
        mask = _additive_mask(kv, positions.unsqueeze(0), num_blocks * bs).unsqueeze(1)
        group = AttentionGroup(1, positions.numel(), table, mask)
    return PagedBatch(positions, write_blocks, positions % bs, last, (group,))


def decode_batch(
    kv: PagedKv, block_tables: Sequence[Sequence[int]], positions: Sequence[int]
) -> PagedBatch:
    """One new token per sequence, at ``positions[i]``, attending over ``block_tables[i]``."""
    bs = kv.block_size
    for table, position in zip(block_tables, positions, strict=True):
        if position < 0:
            raise InvalidInput(f"position {position} is negative")
        _check_capacity(table, position, bs)
    num_blocks = max(positions) // bs + 1
    tables = _table_tensor(kv, block_tables, num_blocks)
    pos = torch.tensor(positions, dtype=torch.int64, device=kv.device)
    write_blocks = tables.gather(1, (pos // bs).unsqueeze(1)).squeeze(1)
    mask = _additive_mask(kv, pos.unsqueeze(1), num_blocks * bs).unsqueeze(1)
    group = AttentionGroup(len(positions), 1, tables, mask)
    rows = torch.arange(len(positions), device=kv.device)
    return PagedBatch(pos, write_blocks, pos % bs, rows, (group,))
