"""Native prompt hashing (``csrc/prompt_hash.cpp``) against the Python path: identical values.

The Python path is forced with ``FABRIC_NATIVE_KERNELS=0`` (read on every hash), the native one
by building the extension first (skipped with the reason when this machine cannot build it; the
Python path is pinned by ``test_hashing.py``'s vectors either way).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fabric.kvbm.core import extension
from fabric.kvbm.core.hashing import (
    DEFAULT_SEED,
    HashedBlocks,
    hash_token_blocks,
    seed_for_salt,
    sequence_hash_chunks,
)


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    """Skip unless the extension is available (the first run on a machine builds it, ~30 s)."""
    if not extension.build():
        pytest.skip(
            "the native extension is unavailable here (no C++ compiler / ninja, or "
            f"{extension.ENV_SWITCH}=0); test_hashing.py covers the Python path"
        )


@contextmanager
def python_path() -> Iterator[None]:
    """Hash with the Python path inside the block (restores the switch after)."""
    saved = os.environ.get(extension.ENV_SWITCH)
    os.environ[extension.ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[extension.ENV_SWITCH]
        else:
            os.environ[extension.ENV_SWITCH] = saved


def both(
    tokens: list[int], block_size: int, seed: int, parent: int | None
) -> tuple[HashedBlocks, HashedBlocks]:
    assert extension.native() is not None
    native = hash_token_blocks(tokens, block_size, seed=seed, parent=parent)  # type: ignore[arg-type]
    with python_path():
        assert extension.native() is None
        python = hash_token_blocks(tokens, block_size, seed=seed, parent=parent)  # type: ignore[arg-type]
    return native, python


tokens_st = st.lists(st.integers(0, 2**32 - 1), max_size=300)
seeds_st = st.one_of(st.just(DEFAULT_SEED), st.integers(0, 2**64 - 1))
parents_st = st.one_of(st.none(), st.integers(0, 2**64 - 1))


@settings(max_examples=200, deadline=None)
@given(tokens=tokens_st, block_size=st.integers(1, 40), seed=seeds_st, parent=parents_st)
@example(tokens=[], block_size=16, seed=DEFAULT_SEED, parent=None)  # empty prompt
@example(tokens=list(range(15)), block_size=16, seed=DEFAULT_SEED, parent=None)  # partial only
@example(tokens=list(range(33)), block_size=16, seed=0, parent=2**64 - 1)  # partial last block
@example(tokens=[2**32 - 1] * 64, block_size=1, seed=2**64 - 1, parent=0)  # extremes
def test_native_hashes_equal_the_python_path(
    tokens: list[int], block_size: int, seed: int, parent: int | None
) -> None:
    native, python = both(tokens, block_size, seed, parent)
    assert native == python
    assert native.num_blocks == len(tokens) // block_size


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=2000),
    block_size=st.sampled_from([1, 4, 16, 32]),
    salt=st.one_of(st.none(), st.text(max_size=10)),
)
def test_native_chunks_equal_the_python_chunks(
    tokens: list[int], block_size: int, salt: str | None
) -> None:
    """The router's entry point (list input, chunks chained through ``parent``)."""
    seed = seed_for_salt(salt)
    native = list(sequence_hash_chunks(tokens, block_size, seed=seed, first_blocks=3))
    with python_path():
        python = list(sequence_hash_chunks(tokens, block_size, seed=seed, first_blocks=3))
    assert native == python
    flat = [h for chunk in native for h in chunk]
    assert flat == hash_token_blocks(tokens, block_size, seed=seed).sequence_hashes


def test_a_long_prompt_of_numpy_tokens_hashes_identically() -> None:
    """32k int32 tokens (the router-scale prompt size), numpy input on both paths."""
    tokens = np.random.default_rng(14).integers(0, 2**31 - 1, 32 * 1024 + 7, dtype=np.int32)
    native = hash_token_blocks(tokens, 16)
    with python_path():
        python = hash_token_blocks(tokens, 16)
    assert native.num_blocks == python.num_blocks == 2048
    assert native == python


def test_native_hash_prompt_checks_its_input() -> None:
    module = extension.native()
    assert module is not None
    with pytest.raises(ValueError, match="whole u32"):
        module.hash_prompt(b"\x00" * 6, 1, DEFAULT_SEED, None)
    with pytest.raises(ValueError, match="block_size must be positive"):
        module.hash_prompt(b"\x00" * 8, 0, DEFAULT_SEED, None)
    block_bytes, sequence_bytes = module.hash_prompt(b"", 16, DEFAULT_SEED, None)
    assert block_bytes == sequence_bytes == b""
