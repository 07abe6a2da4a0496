"""SharedBlockStore: file format, verification, LRU across restarts, sharing between instances and
processes, crash leftovers, failures and configuration."""

from __future__ import annotations

import errno
import functools
import logging
import multiprocessing
import os
import random
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fabric.errors import ConfigError, InvalidInput, StorageError
from fabric.kvbm.build import shared_store
from fabric.kvbm.config import load_kvbm_config
from fabric.kvbm.core.eviction import LruPolicy
from fabric.kvbm.core.types import SequenceHash
from fabric.kvbm.shared import store as disk_store_module
from fabric.kvbm.shared.format import FLAG_MAC, HEADER_BYTES, key_id, load_mac_key
from fabric.kvbm.shared.store import STALE_TEMP_SECONDS, SharedBlockStore

BB = 1024
COMPAT = 0xC0FFEE
FILE_BYTES = HEADER_BYTES + BB
HEADER = struct.Struct("<4sHHIIQQQQQQ")  # the documented format, spelled out independently


def seq(i: int) -> SequenceHash:
    """Distinct hashes spread over the whole u64 range (and over the fan-out directories)."""
    return SequenceHash((i + 1) * 0x9E3779B97F4A7C15 % (1 << 64))


@functools.cache
def payload(i: int) -> np.ndarray:
    block = np.random.default_rng(i).integers(0, 256, BB, dtype=np.uint8)
    block.flags.writeable = False
    return block


def open_store(
    root: Path, capacity: int = 64, compat: int = COMPAT, **kw: bool
) -> SharedBlockStore:
    return SharedBlockStore(
        root, compat_hash=compat, block_bytes=BB, capacity_blocks=capacity, **kw
    )


def read(store: SharedBlockStore, i: int) -> np.ndarray | None:
    out = np.zeros(BB, dtype=np.uint8)
    return out if store.read_into(seq(i), out) else None


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def block_files(root: Path) -> set[Path]:
    return set(root.rglob("*.kvb"))


def set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SharedBlockStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


# ---- format and round trip -----------------------------------------------------------------


def test_round_trip_layout_and_header(store: SharedBlockStore, tmp_path: Path) -> None:
    h = seq(3)
    assert store.write(h, payload(3)) is True
    name = f"{h:016x}"
    path = tmp_path / f"{COMPAT:016x}" / name[:2] / f"{name}.kvb"
    assert store.block_path(h) == path and path.stat().st_size == FILE_BYTES
    raw = path.read_bytes()
    fields = HEADER.unpack(raw[:HEADER_BYTES])
    magic, version, header_len, _, _, compat, seq_hash, length, payload_sum, _, header_sum = fields
    assert (magic, version, header_len) == (b"KVFB", 1, 64)
    assert (compat, seq_hash, length) == (COMPAT, h, BB)
    assert payload_sum == xxhash.xxh3_64_intdigest(payload(3).tobytes())
    assert header_sum == xxhash.xxh3_64_intdigest(raw[:56])
    assert raw[HEADER_BYTES:] == payload(3).tobytes()

    out = read(store, 3)
    assert out is not None and np.array_equal(out, payload(3))
    assert read(store, 4) is None
    assert len(store) == 1 and store.contains(h) and not store.contains(seq(4))
    s = store.stats
    assert (s.written, s.hits, s.misses, s.corrupt, s.skipped) == (1, 1, 1, 0, 0)
    assert temp_files(tmp_path) == []


def test_accepts_every_buffer_kind(store: SharedBlockStore) -> None:
    torch = pytest.importorskip("torch")
    data = payload(0)
    kinds = {
        "bytes": data.tobytes(),
        "bytearray": bytearray(data.tobytes()),
        "memoryview": memoryview(data),
        "float16 2-D array": data.view(np.float16).reshape(8, -1),
        "bfloat16 tensor": torch.from_numpy(data.copy()).view(torch.bfloat16),
    }
    for i, buf in enumerate(kinds.values()):
        assert store.write(seq(i), buf)
    for i, name in enumerate(kinds):
        out = torch.zeros(BB // 2, dtype=torch.bfloat16)  # a tensor works as ``out`` as well
        assert store.read_into(seq(i), out), name
        assert np.array_equal(out.view(torch.uint8).numpy(), data), name


def test_bad_buffers_and_hashes_are_rejected(store: SharedBlockStore) -> None:
    with pytest.raises(InvalidInput, match="holds 1023 bytes"):
        store.write(seq(0), np.zeros(BB - 1, np.uint8))
    with pytest.raises(InvalidInput, match="C-contiguous"):
        store.write(seq(0), np.zeros((BB, 2), np.uint8)[:, 0])
    with pytest.raises(InvalidInput, match="numpy array"):
        store.write(seq(0), "not a buffer")  # type: ignore[arg-type]
    store.write(seq(0), payload(0))
    with pytest.raises(InvalidInput, match="read-only"):
        store.read_into(seq(0), payload(1))
    with pytest.raises(InvalidInput, match="a block is 1024"):
        store.read_into(seq(0), np.zeros(BB * 2, np.uint8))
    for bad in (-1, 1 << 64):
        with pytest.raises(InvalidInput, match="unsigned 64-bit"):
            store.contains(SequenceHash(bad))
    with pytest.raises(InvalidInput, match="must be an int"):
        store.contains(1.0)  # type: ignore[arg-type]
    assert len(store) == 1 and store.stats.written == 1


def test_present_block_is_skipped_not_rewritten(store: SharedBlockStore) -> None:
    assert store.write(seq(1), payload(1))
    mtime = store.block_path(seq(1)).stat().st_mtime_ns
    assert store.write(seq(1), payload(2)) is False  # content-addressed: same hash, same block
    assert store.write_many([(seq(1), payload(1)), (seq(2), payload(2))]) == 1
    out = read(store, 1)
    assert out is not None and np.array_equal(out, payload(1))
    assert (store.stats.written, store.stats.skipped) == (2, 2)
    assert store.block_path(seq(1)).stat().st_mtime_ns > mtime  # the skip refreshed recency


# ---- restart and LRU -----------------------------------------------------------------------


def test_restart_finds_every_block_in_mtime_order(tmp_path: Path) -> None:
    first = open_store(tmp_path, capacity=5)
    first.write_many((seq(i), payload(i)) for i in range(5))
    first.close()
    base = time.time_ns() - 10**9
    recency = [3, 0, 4, 1, 2]  # least recently used first
    for rank, i in enumerate(recency):
        set_mtime(first.block_path(seq(i)), base + rank * 1000)

    again = open_store(tmp_path, capacity=5)
    assert len(again) == 5 and again.prefix_length([seq(i) for i in range(5)]) == 5
    assert again.stats.adopted == 0  # indexed by the scan, nothing to adopt
    for expect_evicted in recency[:2]:
        again.write(seq(100 + expect_evicted), payload(expect_evicted))
        assert not again.block_path(seq(expect_evicted)).exists()
    assert again.stats.evicted == 2
    for i in recency[2:]:
        out = read(again, i)
        assert out is not None and np.array_equal(out, payload(i))


def test_hit_recency_survives_restart(tmp_path: Path) -> None:
    first = open_store(tmp_path, capacity=3)
    first.write_many((seq(i), payload(i)) for i in range(3))
    assert read(first, 0) is not None  # 0 becomes the most recently used, on disk too
    first.close()
    again = open_store(tmp_path, capacity=3)
    again.write(seq(3), payload(3))
    assert sorted(p.name for p in block_files(tmp_path)) == sorted(
        again.block_path(seq(i)).name for i in (0, 2, 3)
    )


def test_restart_with_smaller_capacity_evicts_oldest(tmp_path: Path) -> None:
    first = open_store(tmp_path, capacity=8)
    first.write_many((seq(i), payload(i)) for i in range(5))
    first.close()
    again = open_store(tmp_path, capacity=2)
    assert len(again) == 2 and again.stats.evicted == 3
    assert block_files(tmp_path) == {again.block_path(seq(i)) for i in (3, 4)}


def test_full_store_evicts_lru_and_hits_and_skips_refresh(tmp_path: Path) -> None:
    store = open_store(tmp_path, capacity=3)
    store.write_many((seq(i), payload(i)) for i in range(3))
    assert read(store, 0) is not None  # order: 1 2 0
    store.write(seq(3), payload(3))  # evicts 1 -> 2 0 3
    assert not store.block_path(seq(1)).exists() and not store.contains(seq(1))
    assert store.write(seq(2), payload(2)) is False  # skip refreshes -> 0 3 2
    store.write(seq(4), payload(4))  # evicts 0 -> 3 2 4
    assert block_files(tmp_path) == {store.block_path(seq(i)) for i in (2, 3, 4)}
    assert len(store) == 3 and store.stats.evicted == 2


def test_index_is_an_lru_policy_evicting_by_last_touch(tmp_path: Path) -> None:
    """Hits, skipped writes and adoptions touch a block; ``contains`` of an indexed one does not."""
    store = open_store(tmp_path, capacity=4)
    assert isinstance(store._index, LruPolicy)
    store.write_many((seq(i), payload(i)) for i in range(3))  # 0 1 2
    open_store(tmp_path).write(seq(9), payload(9))  # another instance's block
    assert store.contains(seq(9)) and store.stats.adopted == 1  # adopted: 0 1 2 9
    assert read(store, 0) is not None  # 1 2 9 0
    assert store.write(seq(1), payload(1)) is False  # 2 9 0 1
    assert store.contains(seq(2))  # no touch: 2 9 0 1
    evicted = []
    for i in range(4, 8):
        before = block_files(tmp_path)
        store.write(seq(i), payload(i))
        gone = before - block_files(tmp_path)
        evicted += [j for j in (0, 1, 2, 9) if store.block_path(seq(j)) in gone]
    assert evicted == [2, 9, 0, 1] and store.stats.evicted == 4 and len(store) == 4


# ---- sharing between instances --------------------------------------------------------------


def test_other_instance_sees_and_adopts_blocks(tmp_path: Path) -> None:
    writer = open_store(tmp_path)
    other = open_store(tmp_path)
    writer.write_many((seq(i), payload(i)) for i in range(4))
    assert len(other) == 0
    assert other.contains(seq(0)) and other.stats.adopted == 1
    assert other.prefix_length([seq(i) for i in range(6)]) == 4
    assert other.stats.adopted == 4 and len(other) == 4
    assert other.write(seq(1), payload(1)) is False and other.stats.written == 0

    writer.write(seq(9), payload(9))  # never looked up by ``other``: a read adopts it
    out = read(other, 9)
    assert out is not None and np.array_equal(out, payload(9)) and other.stats.adopted == 5

    writer.remove(seq(2))  # evicted by the writer: the other's index is stale, reads miss
    assert other.contains(seq(2))  # the index is trusted...
    assert read(other, 2) is None  # ...until a read finds the file gone
    assert not other.contains(seq(2)) and other.stats.corrupt == 0 and len(other) == 4
    writer.remove(seq(3))
    assert other.write(seq(3), payload(3)) is True  # a stale index entry does not skip a write
    out = read(writer, 3)
    assert out is not None and np.array_equal(out, payload(3))


def test_different_compat_hash_never_matches(tmp_path: Path) -> None:
    a = open_store(tmp_path, compat=1)
    b = open_store(tmp_path, compat=2)
    a.write(seq(0), payload(0))
    assert not b.contains(seq(0)) and b.prefix_length([seq(0)]) == 0 and read(b, 0) is None
    assert b.write(seq(0), payload(5)) is True  # its own file, in its own directory
    assert a.block_path(seq(0)) != b.block_path(seq(0))
    out = read(a, 0)
    assert out is not None and np.array_equal(out, payload(0))
    assert open_store(tmp_path, compat=1).rescan() == 1


def test_prefix_length_stops_at_first_miss(store: SharedBlockStore) -> None:
    store.write_many((seq(i), payload(i)) for i in (0, 1, 3))
    assert store.prefix_length([seq(i) for i in range(4)]) == 2
    assert store.prefix_length([seq(0), seq(1)]) == 2
    assert store.prefix_length([seq(2), seq(3)]) == 0
    assert store.prefix_length([]) == 0
    assert store.stats.hits == store.stats.misses == 0  # no payload was read


# ---- corruption ----------------------------------------------------------------------------


def flip(offset: int) -> object:
    def corrupt(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0x40
        path.write_bytes(bytes(raw))

    return corrupt


def truncate(size: int) -> object:
    def corrupt(path: Path) -> None:
        os.truncate(path, size)

    return corrupt


def append_byte(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\0")


CORRUPTIONS = {
    "payload byte": flip(HEADER_BYTES + BB // 2),
    "last payload byte": flip(FILE_BYTES - 1),
    "magic": flip(0),
    "version": flip(4),
    "payload length": flip(32),
    "payload checksum": flip(40),
    "created_ns (header checksum)": flip(48),
    "header checksum": flip(56),
    "truncated by one byte": truncate(FILE_BYTES - 1),
    "header only": truncate(HEADER_BYTES),
    "half a header": truncate(HEADER_BYTES // 2),
    "empty": truncate(0),
    "one byte too long": append_byte,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_file_is_a_miss_and_removed(
    store: SharedBlockStore, corrupt: object, caplog: pytest.LogCaptureFixture
) -> None:
    store.write_many((seq(i), payload(i)) for i in range(2))
    path = store.block_path(seq(0))
    corrupt(path)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="fabric.kvbm.shared.store"):
        assert read(store, 0) is None
    assert not path.exists()
    assert (store.stats.corrupt, store.stats.misses, len(store)) == (1, 1, 1)
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert read(store, 0) is None and store.stats.corrupt == 1  # gone now: a plain miss
    assert read(store, 1) is not None
    assert store.write(seq(0), payload(0)) is True and read(store, 0) is not None


def test_header_of_another_compat_hash_is_a_miss(tmp_path: Path) -> None:
    theirs = open_store(tmp_path / "a", compat=1)
    ours = open_store(tmp_path / "b", compat=2)
    theirs.write(seq(0), payload(0))
    target = ours.block_path(seq(0))
    target.parent.mkdir(parents=True)
    shutil.copy(theirs.block_path(seq(0)), target)
    assert read(ours, 0) is None and not target.exists() and ours.stats.corrupt == 1


def test_file_renamed_to_another_hash_is_a_miss(store: SharedBlockStore) -> None:
    store.write(seq(0), payload(0))
    target = store.block_path(seq(1))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(store.block_path(seq(0)), target)
    assert read(store, 1) is None and not target.exists() and store.stats.corrupt == 1
    assert read(store, 0) is None and store.stats.corrupt == 1  # absent, not corrupt


def test_rescan_checks_headers_and_sizes(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.write_many((seq(i), payload(i)) for i in range(5))
    flip(0)(store.block_path(seq(0)))  # type: ignore[operator]
    truncate(FILE_BYTES - 1)(store.block_path(seq(1)))  # type: ignore[operator]
    renamed = store.block_path(seq(7))  # seq(2)'s bytes under seq(7)'s name
    renamed.parent.mkdir(parents=True, exist_ok=True)
    os.rename(store.block_path(seq(2)), renamed)
    flip(FILE_BYTES - 1)(store.block_path(seq(3)))  # payload: found by the next read only
    foreign = store.block_path(seq(4)).parent / "notes.txt"
    foreign.write_text("not ours")
    again = open_store(tmp_path)
    assert again.stats.corrupt == 3 and len(again) == 2 and not renamed.exists()
    assert again.prefix_length([seq(3), seq(4)]) == 2
    assert read(again, 3) is None and again.stats.corrupt == 4
    assert foreign.exists()  # files that are not block files are left alone


def test_read_many_stops_at_first_bad_block(store: SharedBlockStore) -> None:
    store.write_many((seq(i), payload(i)) for i in range(5))
    flip(HEADER_BYTES)(store.block_path(seq(2)))  # type: ignore[operator]
    out = np.zeros((5, BB), dtype=np.uint8)
    assert store.read_many([seq(i) for i in range(5)], out) == 2
    assert np.array_equal(out[:2], np.stack([payload(0), payload(1)]))
    assert store.read_many([seq(3), seq(4), seq(99)], out) == 2
    assert store.read_many([], out) == 0
    with pytest.raises(InvalidInput, match="at least 5 rows"):
        store.read_many([seq(i) for i in range(5)], np.zeros((4, BB), np.uint8))
    with pytest.raises(InvalidInput, match="rows of 1024"):
        store.read_many([seq(0)], np.zeros((1, BB + 1), np.uint8))


# ---- concurrency ---------------------------------------------------------------------------


def run_threads(target: object, num_threads: int) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(num_threads)

    def run(k: int) -> None:
        try:
            barrier.wait(timeout=10)
            target(k)  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == [], errors


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    store = open_store(tmp_path, capacity=256)
    num = 64

    def write_and_read(k: int) -> None:
        order = list(range(num))
        random.Random(k).shuffle(order)
        for i in order:
            store.write(seq(i), payload(i))
            out = read(store, i)
            assert out is not None and np.array_equal(out, payload(i))

    run_threads(write_and_read, 8)
    assert len(store) == num and store.stats.written + store.stats.skipped == 8 * num
    assert store.stats.written >= num and store.stats.corrupt == 0
    assert temp_files(tmp_path) == [] and len(block_files(tmp_path)) == num


def test_reads_racing_eviction_never_return_garbage(tmp_path: Path) -> None:
    store = open_store(tmp_path, capacity=4)
    num = 200

    def churn(k: int) -> None:
        rng = random.Random(k)
        for i in range(num):
            if k % 2 == 0:
                store.write(seq(i), payload(i))
            j = rng.randrange(num)
            out = read(store, j)
            assert out is None or np.array_equal(out, payload(j))

    run_threads(churn, 4)
    assert len(store) <= 4 and store.stats.corrupt == 0 and temp_files(tmp_path) == []


def _process_writer(root: str, order: list[int], barrier: object) -> None:
    """Runs in a spawned process: write ``order``'s blocks, then read each one back."""
    store = open_store(Path(root), capacity=1024)
    barrier.wait(timeout=30)  # type: ignore[attr-defined]
    for i in order:
        store.write(seq(i), payload(i))
    for i in order:
        out = read(store, i)
        assert out is not None and np.array_equal(out, payload(i)), i
    store.close()


def test_concurrent_writers_from_two_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    orders = [list(range(0, 48)), list(reversed(range(16, 64)))]  # overlapping, both directions
    procs = [
        ctx.Process(target=_process_writer, args=(str(tmp_path), order, barrier))
        for order in orders
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    store = open_store(tmp_path)
    assert len(store) == 64 and store.stats.corrupt == 0
    out = np.zeros((64, BB), dtype=np.uint8)
    assert store.read_many([seq(i) for i in range(64)], out) == 64
    assert np.array_equal(out, np.stack([payload(i) for i in range(64)]))
    assert temp_files(tmp_path) == []


# ---- crash leftovers and failures ----------------------------------------------------------


def test_rescan_removes_stale_temp_files_only(store: SharedBlockStore, tmp_path: Path) -> None:
    store.write(seq(0), payload(0))
    fanout = store.block_path(seq(0)).parent
    stale = fanout / f".{seq(0):016x}.kvb.dead.123.0.tmp"
    fresh = fanout / f".{seq(0):016x}.kvb.live.456.0.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    set_mtime(stale, time.time_ns() - int(2 * STALE_TEMP_SECONDS * 1e9))
    assert store.rescan() == 1
    assert temp_files(tmp_path) == [fresh]  # a live writer's file is left alone
    set_mtime(fresh, time.time_ns() - int(2 * STALE_TEMP_SECONDS * 1e9))
    assert len(open_store(tmp_path)) == 1 and temp_files(tmp_path) == []  # the open scans too


def test_disk_full_raises_storage_error_and_leaves_no_temp(
    store: SharedBlockStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", no_space)
    with pytest.raises(StorageError, match="free space") as info:
        store.write(seq(0), payload(0))
    assert str(store.block_path(seq(0))) in str(info.value)
    assert temp_files(tmp_path) == [] and block_files(tmp_path) == set() and len(store) == 0
    monkeypatch.undo()
    assert store.write(seq(0), payload(0)) and read(store, 0) is not None


def test_blocked_fanout_directory_raises_storage_error(
    store: SharedBlockStore, tmp_path: Path
) -> None:
    blocker = store.block_path(seq(0)).parent
    blocker.write_bytes(b"a file where the fan-out directory belongs")
    with pytest.raises(StorageError, match=f"{seq(0):016x}"):
        store.write(seq(0), payload(0))
    assert temp_files(tmp_path) == [] and len(store) == 0


@pytest.mark.parametrize(
    "failure",
    [
        ("create_exclusive", errno.EACCES, "writable"),  # the temp file cannot be created
        ("pwritev_all", errno.ENOSPC, "free space"),  # the filesystem fills mid-write
    ],
    ids=["no-access", "no-space"],
)
def test_failed_write_raises_storage_error_and_leaves_no_temp(
    store: SharedBlockStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: tuple[str, int, str],
) -> None:
    """Injected, so it runs as root too (root ignores directory permissions)."""
    where, code, advice = failure
    store.write(seq(0), payload(0))

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(disk_store_module, where, fail)
    with pytest.raises(StorageError, match=advice):
        store.write(seq(1), payload(1))
    assert temp_files(tmp_path) == [] and len(store) == 1 and not store.contains(seq(1))


# ---- lifecycle and configuration -----------------------------------------------------------


def test_remove_and_close(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fabric.kvbm.shared.store"):
        store = open_store(tmp_path / "new" / "parents")
    assert any("blocks indexed" in r.getMessage() for r in caplog.records)
    store.write_many((seq(i), payload(i)) for i in range(2))
    assert store.remove(seq(0)) is True and not store.block_path(seq(0)).exists()
    assert store.remove(seq(0)) is False and len(store) == 1
    store.close()
    store.close()
    assert len(store) == 0
    with pytest.raises(StorageError, match="closed"):
        store.write(seq(2), payload(2))
    with pytest.raises(StorageError, match="closed"):
        read(store, 1)
    assert open_store(tmp_path / "new" / "parents").rescan() == 1  # the files outlive close


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_bytes": 0}, "block_bytes"),
        ({"block_bytes": -4}, "block_bytes"),
        ({"block_bytes": 1.5}, "block_bytes"),
        ({"capacity_blocks": 0}, "capacity_blocks"),
        ({"compat_hash": -1}, "compat_hash"),
        ({"compat_hash": 1 << 64}, "compat_hash"),
    ],
)
def test_bad_numbers_raise_config_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"compat_hash": COMPAT, "block_bytes": BB, "capacity_blocks": 4} | kwargs
    with pytest.raises(ConfigError, match=match):
        SharedBlockStore(tmp_path, **args)


def test_bad_root_raises_config_error(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        open_store(a_file)
    with pytest.raises(ConfigError, match="cannot create"):
        open_store(a_file / "below")


def test_unwritable_root_raises_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.access`` says no (injected: root may write anywhere)."""
    monkeypatch.setattr(disk_store_module.os, "access", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match="writable"):
        open_store(tmp_path / "ro")


# ---- stateful: random operations and restarts against an LRU model -------------------------

CAPACITY = 3


class DiskStoreMachine(RuleBasedStateMachine):
    """write / read / remove / restart against an ordered-dict LRU model of capacity 3."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="disk-store-machine-"))
        self.store = open_store(self.root, capacity=CAPACITY)
        self.model: OrderedDict[int, None] = OrderedDict()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(i=st.integers(0, 5))
    def write(self, i: int) -> None:
        present = i in self.model
        assert self.store.write(seq(i), payload(i)) is (not present)
        self.model[i] = None
        self.model.move_to_end(i)
        while len(self.model) > CAPACITY:
            self.model.popitem(last=False)

    @rule(i=st.integers(0, 5))
    def read(self, i: int) -> None:
        out = read(self.store, i)
        assert (out is not None) is (i in self.model)
        if out is not None:
            assert np.array_equal(out, payload(i))
            self.model.move_to_end(i)

    @rule(i=st.integers(0, 5))
    def remove(self, i: int) -> None:
        assert self.store.remove(seq(i)) is (i in self.model)
        self.model.pop(i, None)

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = open_store(self.root, capacity=CAPACITY)

    @invariant()
    def matches_model(self) -> None:
        assert len(self.store) == len(self.model)
        assert block_files(self.root) == {self.store.block_path(seq(i)) for i in self.model}
        assert self.store.stats.corrupt == 0 and temp_files(self.root) == []


DiskStoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None
)
TestDiskStoreMachine = DiskStoreMachine.TestCase


def test_a_write_racing_the_eviction_of_its_block_rewrites_it(tmp_path: Path) -> None:
    """The copy thread writes a block while the owner thread evicts it: the write waits for
    the unlink (one lock), finds no file and writes it again; it never indexes a file that the
    eviction then removes."""
    store = SharedBlockStore(tmp_path, compat_hash=COMPAT, block_bytes=BB, capacity_blocks=2)
    store.write(seq(0), payload(0))
    store.write(seq(1), payload(1))
    unlink = store._unlink_victims
    racer: list[threading.Thread] = []

    def evict_while_a_write_starts(victims: list[SequenceHash]) -> None:
        if victims == [seq(0)] and not racer:
            racer.append(threading.Thread(target=store.write, args=(seq(0), payload(0))))
            racer[0].start()
            racer[0].join(0.2)
            assert racer[0].is_alive()  # held off until the eviction is done
        unlink(victims)

    store._unlink_victims = evict_while_a_write_starts  # type: ignore[method-assign]
    store.write(seq(2), payload(2))  # evicts block 0
    racer[0].join(10)
    assert not racer[0].is_alive()
    assert store.contains(seq(0)) and store.block_path(seq(0)).exists()  # written again
    got = read(store, 0)
    assert got is not None and np.array_equal(got, payload(0))


# ---- keyed stores (a MAC on every file) -----------------------------------------------------

KEY = b"k" * 32


def keyed_store(root: Path, key: bytes = KEY) -> SharedBlockStore:
    return SharedBlockStore(root, compat_hash=COMPAT, block_bytes=BB, capacity_blocks=64, key=key)


def test_a_keyed_store_round_trips_in_a_directory_of_its_own(tmp_path: Path) -> None:
    keyed = keyed_store(tmp_path)
    assert keyed.write(seq(0), payload(0)) is True
    path = keyed.block_path(seq(0))
    assert path.parent.parent.name == f"{COMPAT:016x}-k{key_id(KEY)}"
    fields = HEADER.unpack(path.read_bytes()[:HEADER_BYTES])
    assert fields[3] == FLAG_MAC and path.stat().st_size == FILE_BYTES
    assert np.array_equal(read(keyed, 0), payload(0))
    # An unkeyed instance and one with another key share the root but never see these files.
    plain, other = open_store(tmp_path), keyed_store(tmp_path, b"x" * 32)
    assert read(plain, 0) is None and read(other, 0) is None
    assert path.exists() and (plain.stats.corrupt, other.stats.corrupt) == (0, 0)
    assert np.array_equal(read(keyed_store(tmp_path), 0), payload(0))  # a restart finds it


def forge_plain(keyed: SharedBlockStore, tmp_path: Path, i: int) -> Path:
    """A file any writer of the directory can make: valid checksums, no key."""
    plain = open_store(tmp_path / "attacker")
    plain.write(seq(i), payload(i + 100))
    target = keyed.block_path(seq(i))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(plain.block_path(seq(i)), target)
    return target


def forge_other_key(keyed: SharedBlockStore, tmp_path: Path, i: int) -> Path:
    """A file with a MAC made with the wrong key, moved to where the store looks."""
    other = keyed_store(tmp_path / "attacker", b"x" * 32)
    other.write(seq(i), payload(i + 100))
    target = keyed.block_path(seq(i))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(other.block_path(seq(i)), target)
    return target


def forge_payload(keyed: SharedBlockStore, tmp_path: Path, i: int) -> Path:
    """A genuine file whose payload was replaced (the header, and its checksum, untouched)."""
    keyed.write(seq(i), payload(i))
    path = keyed.block_path(seq(i))
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES:] = payload(i + 100).tobytes()
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("forge", [forge_plain, forge_other_key, forge_payload])
def test_a_keyed_store_never_serves_a_forged_file(tmp_path: Path, forge: object) -> None:
    keyed = keyed_store(tmp_path / "g4")
    path = forge(keyed, tmp_path, 0)  # type: ignore[operator]
    assert read(keyed, 0) is None and not path.exists() and keyed.stats.corrupt == 1


def test_mac_keys_are_read_from_files_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "key"
    good.write_bytes(b"a" * 64 + b"\n")
    good.chmod(0o600)
    assert load_mac_key(good) == b"a" * 64
    short = tmp_path / "short"
    short.write_bytes(b"abc\n")
    with pytest.raises(ConfigError, match="has 3 bytes; use at least 32"):
        load_mac_key(short)
    with pytest.raises(ConfigError, match="cannot read the G4 MAC key file"):
        load_mac_key(tmp_path / "missing")


def test_the_shared_tier_setting_opens_a_keyed_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    monkeypatch.setenv("FABRIC_SHARED_DISK_KEY_FILE", str(key_file))
    config = load_kvbm_config(block_size=4, shared_disk_dir=tmp_path / "g4", shared_disk_blocks=8)
    store = shared_store(config, COMPAT, BB)
    assert store is not None
    store.write(seq(0), payload(0))
    assert store.block_path(seq(0)).parent.parent.name.endswith(f"-k{key_id(KEY)}")
