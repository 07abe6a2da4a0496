"""SequenceBlocks: one request's device blocks, from prefix match to release.

Lifecycle::

    open (match + onboard the cached prefix) ──reserve──▶ blocks for N tokens
        ──append / commit──▶ full blocks registered as they complete ──release──▶ all returned

``open`` takes the longest prefix any tier holds (``KvBlockManager.onboard_prefix``; which tier
each run came from is kept in ``cached_sources``); when the whole prompt is cached it gives back
the last matched block, so at least one position is computed and the engine has logits to sample
from (the recomputed block deduplicates on registration).
``reserve`` allocates the blocks a length needs; "no room now" is the value False, a request that
could never fit raises ``PoolExhausted``. ``commit`` records that the K/V of every appended token
(or of the first ``num_tokens``: a prompt prefilled chunk by chunk) is written and registers each
block that became full, chained on the previous block's hash, and passes each registered handle
to ``on_registered`` (the worker's offload manager) if given. A block is registered only once
every one of its positions is committed.

Invariants: ``block_table[i]`` holds tokens ``i*block_size .. (i+1)*block_size - 1``; the
first ``num_computed // block_size`` blocks are registered (held by ``ImmutableBlocks``), the rest
are owned by ``MutableBlocks`` handles in table order; a duplicate registration swaps the table
entry for the block that already held the hash; ``release`` returns every handle once and is
idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fabric.errors import InvalidInput
from fabric.kvbm.core.block import ImmutableBlocks, MutableBlocks
from fabric.kvbm.core.types import BlockId, SequenceHash, Tier
from fabric.kvbm.manager import KvBlockManager

logger = logging.getLogger(__name__)

OnRegistered = Callable[[ImmutableBlocks], None]


class SequenceBlocks:
    """A request's tokens and the device blocks holding their K/V. Build with ``open``."""

    def __init__(
        self,
        kvbm: KvBlockManager,
        prompt: Sequence[int],
        cached: ImmutableBlocks,
        *,
        on_registered: OnRegistered | None = None,
    ):
        self._kvbm = kvbm
        self._on_registered = on_registered
        self.block_size = kvbm.block_size
        self.tokens: list[int] = list(prompt)
        self.block_table: list[BlockId] = cached.block_ids
        self.num_cached_tokens = len(cached) * self.block_size
        self.num_computed = self.num_cached_tokens
        self.num_matched_blocks = len(cached)
        """Full prompt blocks some tier held at ``open``: one more than the cached ones when the
        whole block-aligned prompt was found (its last block is recomputed for the last token)."""
        self.cached_sources: tuple[tuple[Tier, int], ...] = (
            ((Tier.DEVICE, len(cached)),) if len(cached) else ()
        )
        """Where the cached blocks were found: ``(tier, number of blocks)`` runs in table order
        (``KvBlockManager.onboard_prefix``), summing to the cached blocks."""
        self._hashes: list[SequenceHash] = cached.sequence_hashes
        self._held: list[ImmutableBlocks] = [cached]
        self._open: list[MutableBlocks] = []

    @classmethod
    def open(
        cls,
        kvbm: KvBlockManager,
        prompt: Sequence[int],
        *,
        on_registered: OnRegistered | None = None,
    ) -> SequenceBlocks:
        """Match the prompt's cached prefix over every tier, onboarding host and disk hits to
        the device (leaving at least one token to compute); ``on_registered`` sees each block
        ``commit`` registers."""
        if not prompt:
            raise InvalidInput("the prompt is empty; give at least one token")
        hashes = kvbm.hash_tokens(prompt).sequence_hashes
        prefix = kvbm.onboard_prefix(hashes)
        cached, sources = prefix.blocks, list(prefix.sources)
        num_matched = len(cached)
        if num_matched * kvbm.block_size == len(prompt):
            trimmed = kvbm.pool(cached.tier).retain(cached, range(len(cached) - 1))
            kvbm.release(cached)
            cached = trimmed
            tier, count = sources.pop()
            if count > 1:
                sources.append((tier, count - 1))
        logger.debug("sequence: %d of %d prompt blocks cached", len(cached), len(hashes))
        seq = cls(kvbm, prompt, cached, on_registered=on_registered)
        seq.num_matched_blocks = num_matched
        seq.cached_sources = tuple(sources)
        return seq

    def reserve(self, num_tokens: int) -> bool:
        """Make the table hold ``num_tokens`` tokens; False (nothing changed) if the pool is full.

        Raises:
            PoolExhausted: the blocks asked for exceed the whole device pool.
        """
        needed = -(-num_tokens // self.block_size) - len(self.block_table)
        if needed <= 0:
            return True
        blocks = self._kvbm.allocate(needed)
        if blocks is None:
            return False
        self._open.append(blocks)
        self.block_table.extend(blocks.block_ids)
        return True

    def append(self, token: int) -> None:
        """Add a token whose K/V is not written yet (the engine writes it, then ``commit``)."""
        self.tokens.append(token)

    def commit(self, num_tokens: int | None = None) -> None:
        """The K/V of the first ``num_tokens`` tokens (default: every token) is now written:
        register each block that became full (a chunked prefill commits chunk by chunk).

        Raises:
            InvalidInput: ``num_tokens`` is below what was committed or above the tokens, or
                the tokens exceed the reserved slots.
        """
        done = len(self.tokens) if num_tokens is None else num_tokens
        if not self.num_computed <= done <= len(self.tokens):
            raise InvalidInput(
                f"commit of {done} tokens: {self.num_computed} are committed already, "
                f"{len(self.tokens)} exist"
            )
        capacity = len(self.block_table) * self.block_size
        if done > capacity:
            raise InvalidInput(
                f"{done} tokens written into {capacity} reserved slots; reserve first"
            )
        self.num_computed = done
        start = len(self._hashes)
        num_new = self.num_computed // self.block_size - start
        if num_new <= 0:
            return
        bs = self.block_size
        new_tokens = self.tokens[start * bs : (start + num_new) * bs]
        parent = self._hashes[-1] if self._hashes else None
        hashes = self._kvbm.hash_tokens(new_tokens, parent=parent).sequence_hashes
        done = 0
        while done < num_new:
            n = min(num_new - done, len(self._open[0]))
            head = self._open.pop(0)
            head.advance(n * bs)
            full, rest = head.split(n)
            if len(rest):
                self._open.insert(0, rest)
            else:
                self._kvbm.release(rest)
            registered = self._kvbm.register(
                full,
                hashes[done : done + n],
                parent_hash=self._hashes[-1] if self._hashes else None,
                token_ids=new_tokens[done * bs : (done + n) * bs],
            )
            self._held.append(registered)
            if self._on_registered is not None:
                self._on_registered(registered)
            self.block_table[start + done : start + done + n] = registered.block_ids
            self._hashes.extend(hashes[done : done + n])
            done += n

    def release(self) -> None:
        """Return every block (registered ones stay cached for later prefix hits)."""
        handles: list[ImmutableBlocks | MutableBlocks] = [*self._held, *self._open]
        for handle in handles:
            if handle.live:
                self._kvbm.release(handle)
        self._held.clear()
        self._open.clear()

    def __enter__(self) -> SequenceBlocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
