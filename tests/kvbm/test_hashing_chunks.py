"""``sequence_hash_chunks``: the batch entry point gives ``sequence_hashes``'s hashes bit for bit,
chunk by chunk, and refuses what ``sequence_hashes`` refuses."""

from __future__ import annotations

import numpy as np
import pytest

from fabric.errors import InvalidInput
from fabric.kvbm.core.hashing import seed_for_salt, sequence_hash_chunks, sequence_hashes


@pytest.mark.parametrize("num_tokens", [0, 15, 16, 17 * 16 + 5, 100 * 16, 1000 * 16 + 3])
@pytest.mark.parametrize("first_blocks, growth", [(16, 2), (16, 4), (1, 1), (3, 5)])
def test_chunks_join_into_the_whole_prompts_hashes(
    num_tokens: int, first_blocks: int, growth: int
) -> None:
    tokens = [(7 * i + 2**31) % 2**32 for i in range(num_tokens)]  # high ids too
    seed = seed_for_salt("model-x")
    chunks = list(
        sequence_hash_chunks(tokens, 16, seed=seed, first_blocks=first_blocks, growth=growth)
    )
    assert [h for chunk in chunks for h in chunk] == sequence_hashes(tokens, 16, seed=seed)
    sizes = [len(chunk) for chunk in chunks]
    assert sizes[:-1] == [first_blocks * growth**i for i in range(len(sizes) - 1)]
    as_array = np.array(tokens, dtype=np.int64)  # not a list: the numpy path, same hashes
    joined = [h for chunk in sequence_hash_chunks(as_array, 16, seed=seed) for h in chunk]
    assert joined == sequence_hashes(tokens, 16, seed=seed)


def test_chunks_are_hashed_only_when_read() -> None:
    tokens = list(range(64 * 16)) + [-1] * 16  # the bad token is in the last chunk
    chunks = sequence_hash_chunks(tokens, 16, first_blocks=16, growth=2)
    assert len(next(chunks)) == 16
    assert len(next(chunks)) == 32
    with pytest.raises(InvalidInput, match=">= 0"):
        next(chunks)


@pytest.mark.parametrize("bad", [[1, 2**32] * 8, [1.5] * 16, [-3] * 16])
def test_bad_tokens_are_refused_as_sequence_hashes_refuses_them(bad: list[float]) -> None:
    with pytest.raises(InvalidInput) as expected:
        sequence_hashes(bad, 16)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as got:
        list(sequence_hash_chunks(bad, 16))  # type: ignore[arg-type]
    assert str(got.value) == str(expected.value)
