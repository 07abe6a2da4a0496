"""Storages: tensor factories, shared host memory across processes, the preallocated disk file."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fabric.errors import InvalidInput, LayoutMismatch, StorageError
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.tiers.storage import (
    DiskStorage,
    MemoryKind,
    adopt_tensors,
    device_storage,
    host_storage,
)

FC = LayoutKind.FULLY_CONTIGUOUS
LS = LayoutKind.LAYER_SEPARATE
REPO = Path(__file__).resolve().parents[2]


def spec(kind: LayoutKind = FC, alignment: int = 1, num_blocks: int = 8) -> LayoutSpec:
    return LayoutSpec(kind, num_blocks, 3, 2, 4, 8, torch.float16, alignment=alignment)


def digest(storage_tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in storage_tensors:
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- tensor storages -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [FC, LS])
@pytest.mark.parametrize("alignment", [1, 4096])
def test_device_and_host_storage_match_layout(kind: LayoutKind, alignment: int) -> None:
    layout = spec(kind, alignment)
    for storage in (device_storage(layout), host_storage(layout)):
        assert storage.kind is MemoryKind.DRAM  # no CUDA here
        assert [tuple(t.shape) for t in storage.tensors] == layout.tensor_shapes()
        layout.check_tensors(storage.tensors)  # dtype, size, contiguity and aligned starts
        infos = storage.buffers()
        assert [b.address for b in infos] == [t.data_ptr() for t in storage.tensors]
        assert all(b.nbytes == layout.buffer_bytes and b.path is None for b in infos)
        assert all(b.address % alignment == 0 for b in infos)
        storage.close()
        assert storage.tensors == []


def test_host_storage_pin_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning is allowed")
    with pytest.raises(InvalidInput, match="pin=True"):
        host_storage(spec(), pin=True)
    assert not host_storage(spec()).tensors[0].is_pinned()


@pytest.mark.parametrize("kind", [FC, LS])
def test_block_view_aliases_the_right_bytes(kind: LayoutKind) -> None:
    layout = spec(kind)
    storage = host_storage(layout)
    for t in storage.tensors:
        t.zero_()
    view = storage.block_view(5, 2, 1)
    assert view.shape == (4, 8)
    view.fill_(3.0)
    if kind is FC:
        full = storage.tensors[0]
        assert torch.equal(full[5, 2, 1], torch.full((4, 8), 3.0, dtype=torch.float16))
        assert int(full.count_nonzero()) == 32
    else:
        assert torch.equal(storage.tensors[2][5, 1], torch.full((4, 8), 3.0, dtype=torch.float16))
        assert sum(int(t.count_nonzero()) for t in storage.tensors) == 32
    with pytest.raises(InvalidInput, match="block id 8"):
        storage.block_view(8, 0, 0)


def test_block_view_skips_padding() -> None:
    layout = spec(FC, alignment=512)  # slot 384 bytes, stride 512
    storage = host_storage(layout)
    storage.tensors[0].zero_()
    storage.block_view(1, 0, 0).fill_(1.0)
    raw = storage.tensors[0].reshape(-1).view(torch.uint8)
    assert raw[:512].count_nonzero() == 0
    assert raw[512 : 512 + 64].count_nonzero() > 0 and raw[512 + 64 :].count_nonzero() == 0


def test_adopt_tensors_wraps_without_copying() -> None:
    layout = spec(LS)
    engine = [torch.randn(s).to(torch.float16) for s in layout.tensor_shapes()]
    storage = adopt_tensors(layout, engine)
    assert [t.data_ptr() for t in storage.tensors] == [t.data_ptr() for t in engine]
    storage.block_view(0, 1, 0).fill_(9.0)
    assert bool((engine[1][0, 0] == 9.0).all())
    storage.close()
    assert engine[1].sum().isfinite()  # still the engine's, still usable
    with pytest.raises(LayoutMismatch):
        adopt_tensors(layout, engine[:2])


# ---- shared host memory across processes -----------------------------------------------------

CHILD = textwrap.dedent(
    """
    import hashlib, sys, torch
    from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
    from fabric.kvbm.tiers.storage import host_storage
    layout = LayoutSpec(LayoutKind.LAYER_SEPARATE, 8, 3, 2, 4, 8, torch.float16)
    storage = host_storage(layout, shared_name=sys.argv[1], create=False)
    h = hashlib.sha256()
    for t in storage.tensors:
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    print(h.hexdigest())
    storage.block_view(6, 2, 1).fill_(-2.5)
    storage.close()
    """
)


def run_child(name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", CHILD, name],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_shared_host_storage_is_visible_to_another_process() -> None:
    torch.manual_seed(1)
    layout = spec(LS)
    name = f"kvbm-test-{uuid.uuid4().hex[:10]}"
    creator = host_storage(layout, shared_name=name)
    try:
        for t in creator.tensors:
            t.copy_(torch.randn(t.shape))
        before = digest(creator.tensors)
        child = run_child(name)
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == before  # the child read what we wrote
        assert torch.equal(creator.block_view(6, 2, 1), torch.full((4, 8), -2.5).half())
        # The attaching process exited without unlinking: a second attach still works.
        again = run_child(name)
        assert again.returncode == 0, again.stderr
        attach = host_storage(layout, shared_name=name, create=False)
        assert digest(attach.tensors) == digest(creator.tensors)
        attach.close()
    finally:
        creator.close()
    with pytest.raises(StorageError, match="does not exist"):
        host_storage(layout, shared_name=name, create=False)


def test_shared_host_storage_refuses_a_smaller_segment_and_duplicates() -> None:
    name = f"kvbm-test-{uuid.uuid4().hex[:10]}"
    small = host_storage(spec(num_blocks=2), shared_name=name)
    try:
        with pytest.raises(StorageError, match="already exists"):
            host_storage(spec(num_blocks=2), shared_name=name)
        with pytest.raises(LayoutMismatch, match="needs"):
            host_storage(spec(num_blocks=4096), shared_name=name, create=False)
    finally:
        small.close()


# ---- disk ------------------------------------------------------------------------------------


def disk_spec(alignment: int = 1, num_blocks: int = 8) -> LayoutSpec:
    # 2048-byte blocks: strides are 4096 (O_DIRECT capable) only with alignment 4096.
    return LayoutSpec(FC, num_blocks, 2, 2, 16, 16, torch.float16, alignment=alignment)


def test_disk_storage_preallocates_and_describes_the_file(tmp_path: Path) -> None:
    layout = disk_spec(alignment=4096)
    disk = DiskStorage(layout, tmp_path, "pool.bin")
    st = os.stat(disk.path)
    assert disk.path == tmp_path / "pool.bin"
    assert st.st_size == layout.buffer_bytes == 8 * 4096
    assert st.st_blocks * 512 >= layout.buffer_bytes  # allocated, not sparse
    (info,) = disk.buffers()
    assert (info.kind, info.address, info.nbytes, info.path) == (
        MemoryKind.FILE,
        0,
        layout.buffer_bytes,
        str(disk.path),
    )
    assert os.fstat(info.device_id).st_ino == st.st_ino  # device_id is the open fd
    disk.close()
    assert not disk.path.exists()
    disk.close()  # idempotent


def test_disk_storage_keep_file(tmp_path: Path) -> None:
    disk = DiskStorage(disk_spec(), tmp_path, keep_file=True)
    disk.close()
    assert disk.path.exists() and disk.path.parent == tmp_path


def test_disk_storage_refuses_layer_separate_and_missing_directory(tmp_path: Path) -> None:
    ls = LayoutSpec(LS, 8, 2, 2, 16, 32, torch.float16)
    with pytest.raises(LayoutMismatch, match="FULLY_CONTIGUOUS"):
        DiskStorage(ls, tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(StorageError, match=str(missing)):
        DiskStorage(disk_spec(), missing)
    DiskStorage(disk_spec(), tmp_path, "x.bin").close()
    keep = DiskStorage(disk_spec(), tmp_path, "x.bin", keep_file=True)
    with pytest.raises(StorageError, match="already exists"):
        DiskStorage(disk_spec(), tmp_path, "x.bin")
    keep.close()


def test_disk_storage_checks_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = disk_spec()
    monkeypatch.setattr(os, "statvfs", lambda _: SimpleNamespace(f_bavail=2, f_frsize=4096))
    with pytest.raises(StorageError, match=f"needs {layout.buffer_bytes} bytes.*only 8192"):
        DiskStorage(layout, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_disk_storage_reports_enospc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StorageError, match=f"no space left.*needs {disk_spec().buffer_bytes}"):
        DiskStorage(disk_spec(), tmp_path)
    assert list(tmp_path.iterdir()) == []  # the partial file was removed


def test_disk_storage_zero_fills_without_fallocate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    layout = disk_spec(alignment=4096)
    disk = DiskStorage(layout, tmp_path)
    assert disk.path.read_bytes() == bytes(layout.buffer_bytes)
    disk.close()


def test_disk_storage_without_zero_fill_fallback_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    with pytest.raises(StorageError, match="zero-fill fallback is off"):
        DiskStorage(disk_spec(alignment=4096), tmp_path, zerofill_fallback=False)
    assert list(tmp_path.iterdir()) == []


def test_disk_storage_o_direct_can_be_turned_off(tmp_path: Path) -> None:
    disk = DiskStorage(disk_spec(alignment=4096), tmp_path, o_direct=False)
    assert not disk.direct
    disk.close()


def random_rows(layout: LayoutSpec, num: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return torch.randint(0, 256, (num * layout.block_stride,), dtype=torch.uint8).numpy()


@pytest.mark.parametrize("alignment", [1, 4096])
def test_disk_read_write_round_trip(tmp_path: Path, alignment: int) -> None:
    layout = disk_spec(alignment, num_blocks=16)
    disk = DiskStorage(layout, tmp_path)
    stride = layout.block_stride
    ids = [9, 10, 11, 3, 0, 15]
    src = disk.staging_buffer(len(ids))
    src[:] = random_rows(layout, len(ids), seed=2)
    disk.write_from(ids, src)
    on_disk = disk.path.read_bytes()
    for i, b in enumerate(ids):
        assert (
            on_disk[b * stride : (b + 1) * stride] == src[i * stride : (i + 1) * stride].tobytes()
        )
    dest = disk.staging_buffer(3)
    disk.read_into([15, 9, 10], dest)
    assert dest.tobytes() == b"".join(
        src[i * stride : (i + 1) * stride].tobytes() for i in (5, 0, 1)
    )
    with pytest.raises(InvalidInput, match="2 blocks need"):
        disk.read_into([1, 2], disk.staging_buffer(1))
    with pytest.raises(InvalidInput, match="block id 16"):
        disk.read_into([16], dest)
    disk.close()
    with pytest.raises(StorageError, match="closed"):
        disk.read_into([1], dest)


def test_disk_uses_o_direct_when_allowed(tmp_path: Path) -> None:
    disk = DiskStorage(disk_spec(alignment=4096), tmp_path)
    buffered = DiskStorage(disk_spec(alignment=1), tmp_path)  # 2048-byte stride
    try:
        assert not buffered.direct
        if not disk.direct:
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        misaligned = np.zeros(2 * 4096 + 1, dtype=np.uint8)[1:]
        with pytest.raises(InvalidInput, match="aligned"):
            disk.read_into([0, 1], misaligned)
        tensor_dest = torch.from_numpy(disk.staging_buffer(2))
        disk.read_into([0, 1], tensor_dest)  # aligned torch tensors are fine
    finally:
        disk.close()
        buffered.close()


def test_disk_falls_back_to_buffered_io_when_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open

    def refuse_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:  # what older tmpfs and some network filesystems do
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    layout = disk_spec(alignment=4096)
    with caplog.at_level(logging.INFO, logger="fabric.kvbm.tiers.storage"):
        disk = DiskStorage(layout, tmp_path)
    try:
        assert not disk.direct
        assert "buffered I/O" in caplog.text
        src = random_rows(layout, 2, seed=3)
        disk.write_from([4, 5], src)
        dest = np.zeros(src.size + 1, dtype=np.uint8)[1:]  # unaligned is fine without O_DIRECT
        disk.read_into([4, 5], dest)
        assert np.array_equal(src, dest)
    finally:
        disk.close()


def test_device_storage_starts_zeroed_even_on_reused_memory() -> None:
    """Attention reads masked slots too: a NaN left in freed memory would poison outputs."""
    layout = spec(num_blocks=4)  # small: the allocator hands freed chunks straight back
    for _ in range(5):
        dirty = device_storage(layout)
        for t in dirty.tensors:
            t.fill_(float("nan"))
        dirty.close()
        del dirty, t
        fresh = device_storage(layout)
        assert all(torch.count_nonzero(t) == 0 for t in fresh.tensors)
        fresh.close()
