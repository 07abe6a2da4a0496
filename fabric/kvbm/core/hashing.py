"""Chained, salted sequence hashes of full token blocks (xxh3-64), the scheme of Dynamo's KVBM.

For a prompt split into full blocks of ``block_size`` tokens (a trailing partial block is never
hashed):

* ``block_hash[i] = xxh3_64(tokens[i*bs:(i+1)*bs] as little-endian u32, seed)``
* ``sequence_hash[0] = block_hash[0]``
* ``sequence_hash[i] = xxh3_64(pack("<QQ", sequence_hash[i-1], block_hash[i]), seed)``

``seed`` is 1337 when there is no salt, which makes ``block_hash`` equal to the local block hash of
Dynamo's KV router (``compute_block_hash_for_seq``), so KV events we publish can be indexed by it.
With a salt (model name, dtype, layout: anything that makes KV incompatible), ``seed =
xxh3_64(salt, 1337)`` and no hash of one salt ever matches a hash of another.

Invariants: hashes depend only on (salt, tokens, block_size) — never on the process (no Python
``hash()``), the platform's byte order, or how the prompt was split into calls (``parent`` chains a
continuation onto the hashes already computed). Test vectors are in ``tests/kvbm/test_hashing.py``.

Two paths, one result: when the ``csrc/`` extension is loaded (``fabric.kvbm.core.extension``),
a whole prompt (or chunk) is hashed in one native call (``csrc/prompt_hash.cpp``, xxHash's own
``XXH3_64bits_withSeed``, about 25 us for 32k tokens); otherwise, with ``FABRIC_NATIVE_KERNELS=0``
or while it builds, one ``xxhash`` call per hash here (about 4 ms). Both hash the same
little-endian u32 token bytes and chain with ``pack("<QQ")``, so the values are identical
(``tests/kvbm/test_hashing_native.py`` compares them over random prompts). The first hash of a
process loads the extension when it is built (importing torch, about a second) and never waits
for a compiler.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import xxhash

from fabric.errors import InvalidInput
from fabric.kvbm.core import extension
from fabric.kvbm.core.types import BlockHash, SequenceHash

if TYPE_CHECKING:
    import torch

DEFAULT_SEED = 1337
"""Seed of the unsalted scheme: equal to the Dynamo KV router's."""

_MAX_TOKEN = 2**32 - 1
_pack_pair = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest
_LITTLE_ENDIAN = sys.byteorder == "little" and array("I").itemsize == 4


def seed_for_salt(salt: str | bytes | None) -> int:
    """The xxh3 seed for a salt: ``DEFAULT_SEED`` without one, else ``xxh3_64(salt, 1337)``."""
    if salt is None:
        return DEFAULT_SEED
    data = salt.encode() if isinstance(salt, str) else bytes(salt)
    return _xxh3(data, DEFAULT_SEED)


@dataclass(frozen=True, slots=True)
class HashedBlocks:
    """The hashes of a prompt's full blocks, in order; both lists have ``num_blocks`` entries."""

    block_hashes: list[BlockHash]
    sequence_hashes: list[SequenceHash]

    @property
    def num_blocks(self) -> int:
        return len(self.sequence_hashes)


def as_token_array(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Token ids as a contiguous little-endian u32 array; raises ``InvalidInput`` on bad input.

    Accepts a sequence of ints, a 1-D integer numpy array or a 1-D integer torch tensor.
    """
    if hasattr(tokens, "detach"):  # torch.Tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidInput(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise InvalidInput(f"token ids must be >= 0, got {int(arr.min())}")
    if int(arr.max()) > _MAX_TOKEN:
        raise InvalidInput(f"token ids must fit in u32, got {int(arr.max())}")
    return np.ascontiguousarray(arr, dtype="<u4")


def hash_token_blocks(
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    block_size: int,
    *,
    seed: int = DEFAULT_SEED,
    parent: SequenceHash | None = None,
) -> HashedBlocks:
    """Hash every full block of ``tokens``.

    Args:
        tokens: the token ids (trailing tokens that do not fill a block are ignored).
        block_size: tokens per block, > 0.
        seed: from ``seed_for_salt``.
        parent: the sequence hash of the block just before ``tokens[0]``, to continue a chain.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise InvalidInput(f"block_size must be a positive int, got {block_size!r}")
    block_hashes, chained = _hashes(as_token_array(tokens).data, block_size, seed, parent)
    return HashedBlocks(cast(list[BlockHash], block_hashes), cast(list[SequenceHash], chained))


def sequence_hashes(
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    block_size: int,
    *,
    seed: int = DEFAULT_SEED,
    parent: SequenceHash | None = None,
) -> list[SequenceHash]:
    """Just the chained sequence hashes of ``hash_token_blocks``."""
    return hash_token_blocks(tokens, block_size, seed=seed, parent=parent).sequence_hashes


def sequence_hash_chunks(
    tokens: Sequence[int] | np.ndarray,
    block_size: int,
    *,
    seed: int = DEFAULT_SEED,
    first_blocks: int = 16,
    growth: int = 2,
) -> Iterator[list[SequenceHash]]:
    """``sequence_hashes(tokens, block_size, seed=seed)`` in chunks, each computed when read:
    ``first_blocks`` blocks, then ``growth`` times as many as the chunk before.

    The batch entry point of a reader that may stop early (the router's prefix walk): a list of
    ints is packed with ``array('I')`` (several times faster than numpy's conversion of a list),
    one chunk at a time, so an unread chunk costs nothing. The hashes are ``sequence_hashes``'s,
    bit for bit; tokens that do not fit in u32 raise ``InvalidInput`` as there.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise InvalidInput(f"block_size must be a positive int, got {block_size!r}")
    end = len(tokens) // block_size * block_size
    start = 0
    parent: SequenceHash | None = None
    num_blocks = max(1, first_blocks)
    while start < end:
        stop = min(end, start + num_blocks * block_size)
        _, chunk = _hashes(_packed_tokens(tokens[start:stop]), block_size, seed, parent)
        yield cast(list[SequenceHash], chunk)  # no NewType call per hash: it is a plain int
        parent = SequenceHash(chunk[-1])
        start = stop
        num_blocks *= max(1, growth)


def _hashes(
    packed: bytes | memoryview, block_size: int, seed: int, parent: int | None
) -> tuple[list[int], list[int]]:
    """``(block hashes, sequence hashes)`` of the full blocks of ``packed`` (little-endian u32
    token bytes, or a memoryview of a contiguous ``<u4`` array), chained onto ``parent``: in one
    native call when the extension is loaded, else one ``xxhash`` call per hash."""
    native = extension.native()
    if native is not None:
        block_bytes, sequence_bytes = native.hash_prompt(packed, block_size, seed, parent)
        return (
            np.frombuffer(block_bytes, dtype="<u8").tolist(),
            np.frombuffer(sequence_bytes, dtype="<u8").tolist(),
        )
    view = memoryview(packed).cast("B")
    step = 4 * block_size
    end = len(view) // step * step
    block_hashes = [_xxh3(view[i : i + step], seed) for i in range(0, end, step)]
    chained: list[int] = []
    append = chained.append
    prev = parent
    for bh in block_hashes:
        prev = bh if prev is None else _xxh3(_pack_pair(prev, bh), seed)
        append(prev)
    return block_hashes, chained


def _packed_tokens(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian u32 bytes (``as_token_array``'s checks, faster for lists)."""
    if isinstance(tokens, list) and _LITTLE_ENDIAN:
        try:
            return array("I", tokens).tobytes()
        except (OverflowError, TypeError):
            pass  # as_token_array names the problem
    return as_token_array(tokens).tobytes()
