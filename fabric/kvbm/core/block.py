"""Block records, lifecycle states and the typed handles through which callers hold blocks.

Lifecycle of one block in a pool::

    RESET ──allocate──▶ PARTIAL ──advance──▶ COMPLETE ──register──▶ REGISTERED
      ▲                  (MutableBlocks owns it)                (ImmutableBlocks hold refs)
      │                                                                │ last release
      └──── release (abort) / evict ◀──── cached: matchable, evictable ◀┘

A block is RESET while it is free with no content. ``allocate`` hands it out inside a
``MutableBlocks`` handle, which owns it exclusively; the handle's ``num_tokens`` says how far the
caller has written, so each block is PARTIAL or COMPLETE (a RESET block of a live handle has no
token yet). ``register`` consumes the mutable handle and returns an ``ImmutableBlocks`` handle
holding one reference per block; ``match`` returns such handles too. When the last reference is
released, a registered block stays in its pool's registry (cached) until the eviction policy
picks it; then it is RESET again.

Handles are spent by the transition that consumes them: using a spent handle raises
``InvalidTransition``, so a block can be neither released twice nor registered after release. An
operation that fails validation leaves the handle live and the blocks untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from fabric.errors import InvalidInput, InvalidTransition
from fabric.kvbm.core.types import BlockId, SequenceHash, Tier


class PoolIdentity(Protocol):
    """What a handle knows of the pool it belongs to (``BlockPool`` satisfies it), so this module
    does not import ``pool.py``. A handle calls into its pool only to release itself when a
    ``with`` block ends."""

    @property
    def tier(self) -> Tier: ...

    @property
    def name(self) -> str: ...

    @property
    def block_size(self) -> int: ...

    def release(self, blocks: ImmutableBlocks) -> None: ...


class BlockState(Enum):
    RESET = "reset"
    PARTIAL = "partial"
    COMPLETE = "complete"
    REGISTERED = "registered"


@dataclass(slots=True)
class BlockRecord:
    """A pool's bookkeeping for one block; only the owning ``BlockPool`` mutates it.

    Invariants: ``ref_count >= 0``; ``sequence_hash`` is set iff the block is registered; a block
    with ``ref_count == 0`` is in exactly one of the pool's reset list or eviction policy.
    """

    block_id: BlockId
    sequence_hash: SequenceHash | None = None
    ref_count: int = 0
    priority: int = 0


class _Handle:
    __slots__ = ("_block_ids", "_live", "_pool")

    def __init__(self, pool: PoolIdentity, block_ids: list[BlockId]) -> None:
        self._pool = pool
        self._block_ids = block_ids
        self._live = True

    @property
    def block_ids(self) -> list[BlockId]:
        """The blocks this handle holds, in sequence order (a copy)."""
        return list(self._block_ids)

    @property
    def live(self) -> bool:
        return self._live

    @property
    def tier(self) -> Tier:
        return self._pool.tier

    def __len__(self) -> int:
        return len(self._block_ids)

    def __iter__(self) -> Iterator[BlockId]:
        return iter(self._block_ids)

    def _check(self, pool: PoolIdentity) -> None:
        if not self._live:
            raise InvalidTransition(f"{type(self).__name__} was already consumed or released")
        if pool is not self._pool:
            raise InvalidTransition(
                f"{type(self).__name__} belongs to the {self._pool.tier.name} pool "
                f"{self._pool.name!r}, not to {pool.name!r}"
            )

    def _spend(self) -> list[BlockId]:
        self._live = False
        return self._block_ids


class MutableBlocks(_Handle):
    """Blocks owned exclusively by one writer, filled in order with ``num_tokens`` tokens."""

    __slots__ = ("_num_tokens",)

    def __init__(self, pool: PoolIdentity, block_ids: list[BlockId], num_tokens: int = 0) -> None:
        super().__init__(pool, block_ids)
        self._num_tokens = num_tokens

    @property
    def block_size(self) -> int:
        return self._pool.block_size

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def capacity(self) -> int:
        return len(self._block_ids) * self._pool.block_size

    @property
    def num_complete(self) -> int:
        return self._num_tokens // self._pool.block_size

    def state(self, index: int) -> BlockState:
        """The state of the ``index``-th block of this handle."""
        if not 0 <= index < len(self._block_ids):
            raise InvalidInput(f"block index {index} out of range for {len(self)} blocks")
        filled = self._num_tokens - index * self._pool.block_size
        if filled >= self._pool.block_size:
            return BlockState.COMPLETE
        return BlockState.PARTIAL if filled > 0 else BlockState.RESET

    def advance(self, num_tokens: int) -> None:
        """Record that ``num_tokens`` more tokens were written after the ones already counted."""
        self._check(self._pool)
        if num_tokens < 0 or self._num_tokens + num_tokens > self.capacity:
            raise InvalidInput(
                f"cannot advance {num_tokens} tokens: {self._num_tokens} of {self.capacity} "
                "slots are used"
            )
        self._num_tokens += num_tokens

    def split(self, num_blocks: int) -> tuple[MutableBlocks, MutableBlocks]:
        """Consume this handle; return (first ``num_blocks`` blocks, the rest), tokens kept.

        The usual use: register the complete head and keep writing into the tail.
        """
        self._check(self._pool)
        if not 0 <= num_blocks <= len(self._block_ids):
            raise InvalidInput(f"cannot split {len(self)} blocks at {num_blocks}")
        ids = self._spend()
        head_tokens = min(self._num_tokens, num_blocks * self._pool.block_size)
        head = MutableBlocks(self._pool, ids[:num_blocks], head_tokens)
        tail = MutableBlocks(self._pool, ids[num_blocks:], self._num_tokens - head_tokens)
        return head, tail

    def __repr__(self) -> str:
        return (
            f"MutableBlocks({self.tier.name}, blocks={self._block_ids}, "
            f"tokens={self._num_tokens}/{self.capacity}, live={self._live})"
        )


class ImmutableBlocks(_Handle):
    """Registered blocks with one reference held on each; release exactly once."""

    __slots__ = ("_sequence_hashes",)

    def __init__(
        self, pool: PoolIdentity, block_ids: list[BlockId], sequence_hashes: list[SequenceHash]
    ) -> None:
        super().__init__(pool, block_ids)
        self._sequence_hashes = sequence_hashes

    @property
    def sequence_hashes(self) -> list[SequenceHash]:
        return list(self._sequence_hashes)

    def join(self, other: ImmutableBlocks) -> ImmutableBlocks:
        """Consume both handles; one handle on ``self``'s blocks followed by ``other``'s."""
        self._check(other._pool)
        other._check(self._pool)
        joined = ImmutableBlocks(
            self._pool,
            self._block_ids + other._block_ids,
            self._sequence_hashes + other._sequence_hashes,
        )
        self._spend()
        other._spend()
        return joined

    def __enter__(self) -> ImmutableBlocks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._pool.release(self)

    def __repr__(self) -> str:
        return f"ImmutableBlocks({self.tier.name}, blocks={self._block_ids}, live={self._live})"
