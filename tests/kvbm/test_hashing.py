"""Hashing: test vectors (stable across processes, versions and machines), chaining, bad input."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from fabric.errors import InvalidInput
from fabric.kvbm.core import extension
from fabric.kvbm.core.hashing import (
    DEFAULT_SEED,
    hash_token_blocks,
    seed_for_salt,
    sequence_hashes,
)

# Test vectors. The first equals Dynamo's KV router (compute_block_hash_for_seq(range(16), 16),
# measured with ai-dynamo-runtime 1.6.1), so our unsalted block hashes index in its router. The
# others pin our chaining and salting: changing them breaks every persisted disk cache and every
# peer running the previous version, so a change here needs a new wire/cache version.
DYNAMO_ROUTER_BLOCK_0_15 = 15310707395893867146
VECTORS = {
    # (salt, tokens, block_size): (block_hashes, sequence_hashes)
    (None, tuple(range(32)), 16): (
        [15310707395893867146, 15292316782987903195],
        [15310707395893867146, 13769157705258532664],
    ),
    ("llama-3|fp16", tuple(range(32)), 16): (
        [2598686303222396554, 3987863998327881772],
        [2598686303222396554, 2503939279535977953],
    ),
}


def reference(tokens: list[int], block_size: int, seed: int) -> tuple[list[int], list[int]]:
    """The documented scheme written out plainly, block by block."""
    blocks, seqs, parent = [], [], None
    for i in range(len(tokens) // block_size):
        chunk = tokens[i * block_size : (i + 1) * block_size]
        bh = xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *chunk), seed)
        sh = (
            bh if parent is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, bh), seed)
        )
        blocks.append(bh)
        seqs.append(sh)
        parent = sh
    return blocks, seqs


def test_unsalted_block_hash_equals_dynamo_router() -> None:
    assert hash_token_blocks(list(range(16)), 16).block_hashes == [DYNAMO_ROUTER_BLOCK_0_15]
    assert seed_for_salt(None) == DEFAULT_SEED == 1337


@pytest.mark.parametrize(("key", "expected"), list(VECTORS.items()))
def test_vectors(
    key: tuple[str | None, tuple[int, ...], int], expected: tuple[list[int], list[int]]
) -> None:
    salt, tokens, block_size = key
    hashed = hash_token_blocks(list(tokens), block_size, seed=seed_for_salt(salt))
    assert (hashed.block_hashes, hashed.sequence_hashes) == expected


def test_stable_across_processes() -> None:
    code = "from fabric.kvbm.core.hashing import sequence_hashes as s;print(s(list(range(64)), 16))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == str(sequence_hashes(list(range(64)), 16))


def test_a_process_without_the_built_extension_hashes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unbuilt extension: the first hash starts the build in the background (here it waits on the
    build lock this test holds) and answers at once with the Python path, values unchanged."""
    monkeypatch.setenv(extension.ENV_BUILD_DIR, str(tmp_path))
    build_dir = extension.build_dir(extension.EXTENSION_NAME)
    build_dir.mkdir(parents=True)
    code = (
        "import logging, os\n"
        "from fabric.kvbm.core import extension, hashing\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "h = hashing.hash_token_blocks(list(range(32)), 16)\n"
        "print(extension.native() is None, h.block_hashes, h.sequence_hashes, flush=True)\n"
        "os._exit(0)  # the build thread is still waiting for the lock\n"
    )
    env = {**os.environ, extension.ENV_BUILD_DIR: str(tmp_path), extension.ENV_SWITCH: "1"}
    with extension.exclusive(build_dir / "kv-fabric-build.lock"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    expected = VECTORS[(None, tuple(range(32)), 16)]
    assert out.stdout.strip() == f"True {expected[0]} {expected[1]}", out.stderr
    assert "building them in the background" in out.stderr


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=200),
    block_size=st.integers(1, 40),
    salt=st.one_of(st.none(), st.text(max_size=8)),
)
def test_matches_reference_scheme(tokens: list[int], block_size: int, salt: str | None) -> None:
    seed = seed_for_salt(salt)
    hashed = hash_token_blocks(tokens, block_size, seed=seed)
    assert (hashed.block_hashes, hashed.sequence_hashes) == reference(tokens, block_size, seed)
    assert hashed.num_blocks == len(tokens) // block_size


def test_parent_continues_the_chain() -> None:
    tokens = list(range(1000, 1160))
    whole = sequence_hashes(tokens, 16)
    head = sequence_hashes(tokens[:64], 16)
    tail = sequence_hashes(tokens[64:], 16, parent=head[-1])
    assert head + tail == whole


def test_salt_separates_and_prefix_property_holds() -> None:
    a = sequence_hashes(list(range(48)), 16, seed=seed_for_salt("model-a"))
    b = sequence_hashes(list(range(48)), 16, seed=seed_for_salt("model-b"))
    assert not set(a) & set(b)
    # a change in block 1 changes every later sequence hash but not block 0's
    changed = list(range(48))
    changed[20] = 7
    c = sequence_hashes(changed, 16, seed=seed_for_salt("model-a"))
    assert c[0] == a[0] and c[1] != a[1] and c[2] != a[2]


def test_accepts_numpy_and_torch_inputs() -> None:
    expected = sequence_hashes(list(range(64)), 16)
    assert sequence_hashes(np.arange(64, dtype=np.int64), 16) == expected
    assert sequence_hashes(torch.arange(64, dtype=torch.int32), 16) == expected
    assert sequence_hashes(np.arange(64, dtype=">u4"), 16) == expected  # byte order normalised


def test_trailing_partial_block_is_not_hashed() -> None:
    assert len(sequence_hashes(list(range(47)), 16)) == 2
    assert sequence_hashes([], 16) == []


@pytest.mark.parametrize(
    ("tokens", "block_size", "match"),
    [
        ([[1, 2], [3, 4]], 2, "1-D"),
        ([1.5, 2.5], 1, "integers"),
        ([-1, 2], 1, ">= 0"),
        ([2**32], 1, "u32"),
        ([1, 2], 0, "positive"),
        ([1, 2], True, "positive"),
    ],
)
def test_bad_input_is_refused(tokens: object, block_size: int, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        hash_token_blocks(tokens, block_size)  # type: ignore[arg-type]
