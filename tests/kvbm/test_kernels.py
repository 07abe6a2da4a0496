"""Native batched copies (csrc/) against the pure fallback, the loader, and copy.py's use of them.

Tests that need the compiled extension skip with a reason when it cannot be built here (no
compiler, or ``FABRIC_NATIVE_KERNELS=0``); the fallback and every copy.py path are tested either
way. The first run on a machine builds the extension (about 30 s); later runs reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fabric.kvbm.tiers.block_copy as copy_module
from fabric.errors import ConfigError, InvalidInput
from fabric.kvbm.core import extension
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.tiers import kernels
from fabric.kvbm.tiers.block_copy import copy_blocks, gather_to_staging, scatter_from_staging
from fabric.kvbm.tiers.storage import DiskStorage, TensorStorage, host_storage

REPO = Path(__file__).resolve().parents[2]
FC = LayoutKind.FULLY_CONTIGUOUS
LS = LayoutKind.LAYER_SEPARATE
FUZZ = settings(max_examples=150, deadline=None)

Chunk = tuple[int, int, int]  # (src offset, dst offset, length)
Copier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@pytest.fixture(scope="module")
def native() -> None:
    """Skip unless the extension is available (the first run on a machine builds it, ~30 s)."""
    if not kernels.build():
        pytest.skip(
            "the native extension is unavailable here (no C++ compiler / ninja, or "
            f"{kernels.ENV_SWITCH}=0); the fallback tests cover the contract"
        )


def as_tensors(chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    table = torch.tensor(chunks, dtype=torch.int64).reshape(-1, 3)
    return table[:, 0].contiguous(), table[:, 1].contiguous(), table[:, 2].contiguous()


def outcome(
    copier: Copier,
    base: torch.Tensor,
    views: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    chunks: list[Chunk],
) -> object:
    """The bytes of ``base`` after the copy, or the error message (nothing may have changed)."""
    base = base.clone()
    before = base.clone()
    src, dst = views(base)
    try:
        copier(src, dst, *as_tensors(chunks))
    except InvalidInput as e:
        assert torch.equal(base, before), "a refused copy must not move any byte"
        return f"error: {e}"
    return base.numpy().tobytes()


# ---- batched_copy: native vs fallback -----------------------------------------------------------


@st.composite
def valid_chunk_lists(draw: st.DrawFn) -> tuple[int, int, list[Chunk]]:
    """Sizes of src and dst and chunks satisfying the contract (disjoint destinations)."""
    src_size = draw(st.integers(0, 600))
    dst_size = draw(st.integers(0, 600))
    cuts = sorted(draw(st.lists(st.integers(0, dst_size), max_size=24)))
    bounds = [0, *cuts, dst_size]
    chunks = []
    for start, end in itertools.pairwise(bounds):
        if draw(st.booleans()):
            length = min(end - start, src_size)
            chunks.append((draw(st.integers(0, src_size - length)), start, length))
    return src_size, dst_size, draw(st.permutations(chunks))


@pytest.mark.usefixtures("native")
@FUZZ
@given(valid_chunk_lists(), st.integers(0, 2**32 - 1))
@example((16, 16, [(0, 8, 8), (8, 0, 8)]), 0)
def test_native_and_fallback_write_the_same_bytes(
    case: tuple[int, int, list[Chunk]], seed: int
) -> None:
    src_size, dst_size, chunks = case
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (src_size + dst_size,), dtype=torch.uint8, generator=generator)

    def views(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return b[:src_size], b[src_size:]

    expected = bytearray(base.numpy().tobytes())
    for s, d, n in chunks:
        expected[src_size + d : src_size + d + n] = base.numpy().tobytes()[s : s + n]
    native = outcome(kernels.batched_copy, base, views, chunks)
    fallback = outcome(kernels.fallback_batched_copy, base, views, chunks)
    assert native == fallback == bytes(expected)


@pytest.mark.usefixtures("native")
@FUZZ
@given(
    st.integers(0, 48),
    st.integers(0, 48),
    st.integers(-8, 40),
    st.lists(st.tuples(*[st.integers(-3, 52)] * 3), max_size=8),
)
@example(16, 16, 8, [(0, 0, 8)])  # dst overlaps its own source in shared memory
@example(16, 16, 40, [(0, 0, 20)])  # beyond the destination
@example(16, 16, 40, [(0, 0, 4), (0, 2, 4)])  # overlapping destinations
def test_native_and_fallback_agree_on_any_chunk_list(
    src_size: int, dst_size: int, dst_start: int, chunks: list[Chunk]
) -> None:
    """Arbitrary chunks, src and dst possibly overlapping views of one buffer: both paths
    refuse with the same message or write the same bytes."""
    dst_start = max(0, dst_start)
    base = torch.arange(dst_start + dst_size + src_size, dtype=torch.int64).to(torch.uint8)

    def views(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return b[:src_size], b[dst_start : dst_start + dst_size]

    native = outcome(kernels.batched_copy, base, views, chunks)
    assert native == outcome(kernels.fallback_batched_copy, base, views, chunks)


@pytest.fixture(params=["native", "fallback"])
def copier(request: pytest.FixtureRequest) -> Copier:
    if request.param == "native":
        request.getfixturevalue("native")
        return kernels.batched_copy
    return kernels.fallback_batched_copy


@pytest.mark.parametrize(
    ("chunks", "needle"),
    [
        ([(0, 0, -1)], "chunk 0 has negative length -1"),
        ([(0, 0, 4), (60, 0, 8)], r"chunk 1 \(offset 60, length 8\) lies outside the source's 64"),
        ([(-1, 0, 4)], r"chunk 0 \(offset -1, length 4\) lies outside the source's"),
        ([(0, 30, 3)], r"chunk 0 \(offset 30, length 3\) lies outside the destination's 32"),
        (
            [(0, 0, 8), (8, 4, 2), (0, 20, 4)],
            r"destination chunks 0 \(\[0, 8\)\) and 1 \(\[4, 6\)\)",
        ),
    ],
)
def test_bad_chunks_are_refused_with_a_clear_message(
    copier: Copier, chunks: list[Chunk], needle: str
) -> None:
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(32, dtype=torch.uint8)
    with pytest.raises(InvalidInput, match=needle):
        copier(src, dst, *as_tensors(chunks))
    assert not dst.any()


def test_copying_onto_its_own_source_is_refused(copier: Copier) -> None:
    buffer = torch.arange(64, dtype=torch.uint8)
    with pytest.raises(InvalidInput, match=r"destination chunk 1 \(\[20, 28\) of dst\) overlaps"):
        copier(buffer, buffer[8:], *as_tensors([(0, 40, 4), (30, 20, 8)]))
    copier(buffer, buffer, *as_tensors([(0, 32, 8)]))  # disjoint chunks of one buffer are fine
    assert buffer[32:40].tolist() == list(range(8))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"src": torch.zeros(8, dtype=torch.int16)}, "src must be a uint8 tensor"),
        ({"dst": torch.zeros(8, 2, dtype=torch.uint8).t()}, "dst must be contiguous"),
        ({"lengths": torch.ones(1, dtype=torch.int32)}, "lengths must be a 1-D contiguous int64"),
        ({"src_offsets": torch.zeros(2, dtype=torch.int64)}, "must have one length; got 2, 1"),
    ],
)
def test_bad_tensors_are_refused(
    copier: Copier, change: dict[str, torch.Tensor], needle: str
) -> None:
    args = {
        "src": torch.zeros(8, dtype=torch.uint8),
        "dst": torch.zeros(8, dtype=torch.uint8),
        "src_offsets": torch.zeros(1, dtype=torch.int64),
        "dst_offsets": torch.zeros(1, dtype=torch.int64),
        "lengths": torch.ones(1, dtype=torch.int64),
    }
    with pytest.raises(InvalidInput, match=needle):
        copier(**{**args, **change})


def test_fallback_copies_many_lengths_and_multidimensional_tensors() -> None:
    src = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(16, 16)
    dst = torch.zeros(8, 32, dtype=torch.uint8)
    chunks = [(0, 100, 7), (50, 0, 7), (200, 10, 30), (3, 40, 0), (9, 60, 1)]
    kernels.fallback_batched_copy(src, dst, *as_tensors(chunks))
    flat_src, expected = src.reshape(-1).tolist(), [0] * dst.numel()
    for s, d, n in chunks:
        expected[d : d + n] = flat_src[s : s + n]
    assert dst.reshape(-1).tolist() == expected


# ---- the switch and the loader ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_env_switch_turns_the_native_path_off(
    value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(kernels.ENV_SWITCH, value)
    assert not kernels.native_available()
    dst = torch.zeros(8, dtype=torch.uint8)
    kernels.batched_copy(torch.arange(8, dtype=torch.uint8), dst, *as_tensors([(2, 0, 3)]))
    assert dst.tolist() == [2, 3, 4, 0, 0, 0, 0, 0]

    def no_native(*args: object) -> None:
        raise AssertionError("copy.py must not use the native kernels when they are off")

    monkeypatch.setattr(kernels, "batched_copy", no_native)
    layout = LayoutSpec(FC, 8, 2, 2, 4, 8, torch.float16)
    src, target = host_storage(layout), host_storage(layout)
    fill_random(src, seed=0)
    copy_blocks(src, [1, 3], target, [0, 2])
    assert read_block(target, 2) == read_block(src, 3)


def test_a_bad_switch_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_SWITCH, "maybe")
    with pytest.raises(ConfigError, match="FABRIC_NATIVE_KERNELS='maybe' is not a switch"):
        kernels.native_available()


def run_python(code: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


LOAD_AND_COPY = """
    import logging
    import torch
    from fabric.kvbm.tiers import kernels
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    dst = torch.zeros(4, dtype=torch.uint8)
    chunks = [torch.tensor([v], dtype=torch.int64) for v in (1, 0, 3)]
    kernels.batched_copy(torch.arange(4, dtype=torch.uint8), dst, *chunks)
    print(kernels.build(), kernels.native_available(), dst.tolist())
"""


def test_serving_never_waits_for_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process whose kernels are not built copies with the fallback at once and builds in the
    background: here that build waits on the build lock this test holds, and the process still
    answers (first call False, bytes right) and exits."""
    monkeypatch.setenv(kernels.ENV_BUILD_DIR, str(tmp_path))
    build_dir = extension.build_dir(extension.EXTENSION_NAME)
    build_dir.mkdir(parents=True)
    code = """
        import logging, os
        import torch
        from fabric.kvbm.tiers import kernels
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        dst = torch.zeros(4, dtype=torch.uint8)
        chunks = [torch.tensor([v], dtype=torch.int64) for v in (1, 0, 3)]
        kernels.batched_copy(torch.arange(4, dtype=torch.uint8), dst, *chunks)
        print(kernels.native_available(), dst.tolist(), flush=True)
        os._exit(0)  # the build thread is still waiting for the lock
    """
    with extension.exclusive(build_dir / "kv-fabric-build.lock"):
        result = run_python(code, {kernels.ENV_BUILD_DIR: str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "[1,", "2,", "3,", "0]"], result.stderr
    assert "building them in the background" in result.stderr


def test_builds_go_to_a_cache_directory_outside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(kernels.ENV_BUILD_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = extension.build_dir(extension.EXTENSION_NAME)
    assert built.parent == tmp_path / "kv-fabric" / "torch_ext"
    monkeypatch.setenv(kernels.ENV_BUILD_DIR, str(tmp_path / "elsewhere"))
    assert extension.build_dir(extension.EXTENSION_NAME).parent == tmp_path / "elsewhere"


def test_a_failed_build_falls_back_and_warns_once(tmp_path: Path) -> None:
    env = {
        kernels.ENV_BUILD_DIR: str(tmp_path),
        kernels.ENV_SWITCH: "1",
        "CXX": "/bin/false",  # a compiler that always fails
    }
    result = run_python(LOAD_AND_COPY, env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "[1,", "2,", "3,", "0]"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr
    assert "native kernels unavailable" in warnings[0]
    assert "/bin/false" in warnings[0]


@pytest.mark.usefixtures("native")
def test_builds_wait_for_each_other_and_a_stale_torch_lock_is_cleared(tmp_path: Path) -> None:
    """A second process waits while the build lock is held, and a ``lock`` file left by a killed
    torch build does not wedge it (torch alone would wait for that file forever)."""
    name = extension.EXTENSION_NAME
    built = extension.build_dir(name)
    if not (built / f"{name}.so").exists():
        pytest.skip(f"the extension was built with CUDA or elsewhere, not in {built}")
    build_dir = tmp_path / built.name
    shutil.copytree(built, build_dir)  # keeps mtimes: ninja finds it up to date
    (build_dir / "lock").touch()
    with extension.exclusive(build_dir / "kv-fabric-build.lock"):
        process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(LOAD_AND_COPY)],
            env={**os.environ, kernels.ENV_BUILD_DIR: str(tmp_path), kernels.ENV_SWITCH: "1"},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert process.poll() is None, "the second process must wait for the build lock"
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.split()[:2] == ["True", "True"], stderr
    assert not (build_dir / "lock").exists()


# ---- the CUDA kernel ----------------------------------------------------------------------------


def test_cuda_source_compiles_with_nvcc() -> None:
    """Compile csrc/block_copy_cuda.cu to an object with torch's headers and nvcc flags.

    A CPU torch wheel ships the ATen/c10 CUDA headers but not the one its CMake build generates
    (``c10/cuda/impl/cuda_cmake_macros.h``); a one-line stand-in is supplied then. A success is
    remembered under the build directory by a hash of the inputs (the compile takes ~30 s).
    """
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernel cannot be compile-checked")
    includes = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAStream.h").is_file() for p in includes):
        pytest.skip("this torch ships no c10/cuda headers to compile the kernel against")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    source = extension.CSRC / "block_copy_cuda.cu"
    work = extension._build_root() / "nvcc_check"
    shim = work / "shim"
    macros = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any((p / macros).is_file() for p in includes):
        (shim / macros).parent.mkdir(parents=True, exist_ok=True)
        (shim / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(shim)
    flags = ["-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS, "-O3", "-Xcompiler", "-fPIC"]
    flags += [f"-I{p}" for p in includes]
    key = hashlib.sha256(
        "\0".join([source.read_text(), version.stdout, torch.__version__, *flags]).encode()
    ).hexdigest()[:16]
    obj = work / f"block_copy_cuda-{key}.o"
    if obj.exists():
        return
    result = subprocess.run(
        [nvcc, *flags, "-c", str(source), "-o", str(obj) + ".tmp"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    os.replace(str(obj) + ".tmp", obj)


@pytest.mark.gpu
def test_cuda_kernel_matches_the_cpu_copy(request: pytest.FixtureRequest) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    request.getfixturevalue("native")
    loaded = extension.native()
    if loaded is None or not loaded.with_cuda:
        pytest.skip("the extension was built without CUDA (torch has no CUDA toolkit home)")
    rng = np.random.default_rng(0)
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    # Unaligned offsets and odd lengths exercise the byte head/tail around 16-byte vectors.
    lengths = rng.integers(0, 5000, 300)
    dst_offsets = np.cumsum(lengths + rng.integers(0, 64, 300)) - lengths
    src_offsets = rng.integers(0, src.numel() - 5000, 300)
    chunks = [tuple(map(int, c)) for c in zip(src_offsets, dst_offsets, lengths, strict=True)]
    expected = torch.zeros(int(dst_offsets[-1] + lengths[-1]) + 64, dtype=torch.uint8)
    kernels.batched_copy(src, expected, *as_tensors(chunks))
    on_gpu = torch.zeros_like(expected, device="cuda")
    kernels.batched_copy(src.cuda(), on_gpu, *as_tensors(chunks))
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), expected)


# ---- copy.py on top of the kernels --------------------------------------------------------------


def make_storage(
    kind: LayoutKind, alignment: int, geometry: str, num_blocks: int = 12
) -> TensorStorage:
    num_layers, outer_dim, block_size, inner_dim, dtype = {
        "kv": (3, 2, 4, 8, torch.float16),
        "odd-bytes": (2, 2, 5, 3, torch.int8),
    }[geometry]
    layout = LayoutSpec(
        kind, num_blocks, num_layers, outer_dim, block_size, inner_dim, dtype, alignment
    )
    return host_storage(layout)


def block_bytes(storage: TensorStorage, block: int) -> bytes:
    layout = storage.layout
    return b"".join(
        storage.block_view(block, layer, outer).contiguous().view(torch.uint8).numpy().tobytes()
        for layer in range(layout.num_layers)
        for outer in range(layout.outer_dim)
    )


def read_block(storage: TensorStorage | DiskStorage, block: int) -> bytes:
    if isinstance(storage, TensorStorage):
        return block_bytes(storage, block)
    with open(storage.path, "rb") as f:
        f.seek(block * storage.layout.block_stride)
        return f.read(storage.layout.block_bytes)


def fill_random(storage: TensorStorage, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for t in storage.tensors:
        t.view(torch.uint8).copy_(
            torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, generator=generator)
        )


@pytest.fixture(params=["native", "slices", "numpy-index"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force one of copy.py's CPU strategies, whatever the run sizes."""
    if request.param == "native":
        request.getfixturevalue("native")
        monkeypatch.setattr(copy_module, "NATIVE_MAX_RUN_BYTES", 1 << 62)
    else:
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        threshold = 0 if request.param == "slices" else 1 << 62
        monkeypatch.setattr(copy_module, "SLICE_MIN_RUN_BYTES", threshold)
    return request.param


@pytest.mark.usefixtures("copy_path")
@pytest.mark.parametrize(
    "kinds", [(FC, FC), (FC, LS), (LS, FC), (LS, LS)], ids=["fc-fc", "fc-ls", "ls-fc", "ls-ls"]
)
@pytest.mark.parametrize("alignments", [(1, 1), (256, 1), (1, 4096)], ids=str)
@pytest.mark.parametrize("geometry", ["kv", "odd-bytes"])
def test_every_cpu_path_copies_the_same_bytes(
    kinds: tuple[LayoutKind, LayoutKind], alignments: tuple[int, int], geometry: str
) -> None:
    src = make_storage(kinds[0], alignments[0], geometry)
    dst = make_storage(kinds[1], alignments[1], geometry)
    fill_random(src, seed=1)
    fill_random(dst, seed=2)
    expected = {b: block_bytes(dst, b) for b in range(12)}
    for src_ids, dst_ids in [
        ([2, 3, 4, 5], [6, 7, 8, 9]),
        ([11, 0, 7, 3], [1, 10, 2, 5]),
        ([4, 4, 9], [11, 3, 4]),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], list(range(12))),
    ]:
        copy_blocks(src, src_ids, dst, dst_ids)
        expected.update({d: block_bytes(src, s) for s, d in zip(src_ids, dst_ids, strict=True)})
        assert {b: block_bytes(dst, b) for b in range(12)} == expected
    # Inside one storage: disjoint ids (native may run on one buffer), then overlapping ones.
    before = {b: block_bytes(dst, b) for b in range(12)}
    copy_blocks(dst, [0, 1], dst, [5, 6])
    copy_blocks(dst, [5, 6, 7], dst, [6, 7, 8])
    after = {b: block_bytes(dst, b) for b in range(12)}
    assert [after[b] for b in (5, 6, 7, 8)] == [before[0], before[0], before[1], before[7]]


class Recorder:
    def __init__(self) -> None:
        self.num_calls = 0
        self._real = kernels.batched_copy

    def __call__(self, *args: torch.Tensor) -> None:
        self.num_calls += 1
        self._real(*args)


@pytest.fixture
def native_calls(native: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder()
    monkeypatch.setattr(kernels, "batched_copy", recorder)
    threads = torch.get_num_threads()
    yield recorder
    torch.set_num_threads(threads)


def test_short_runs_use_the_native_copy_long_runs_use_slices_with_two_threads(
    native_calls: Recorder,
) -> None:
    layout = LayoutSpec(FC, 64, 2, 2, 16, 1024, torch.float16)  # 128 KiB blocks
    src, dst = host_storage(layout), host_storage(layout)
    fill_random(src, seed=3)
    copy_blocks(src, list(range(0, 64, 2)), dst, list(range(32)))  # 128 KiB runs
    assert native_calls.num_calls == 1
    torch.set_num_threads(2)
    copy_blocks(src, list(range(32)), dst, list(range(32, 64)))  # one 4 MiB run
    assert native_calls.num_calls == 1
    torch.set_num_threads(1)  # one thread: native memcpy measured as fast at any run length
    copy_blocks(src, list(range(32)), dst, list(range(32, 64)))
    assert native_calls.num_calls == 2
    assert [block_bytes(dst, 32 + b) for b in range(32)] == [block_bytes(src, b) for b in range(32)]


# ---- staging gather / scatter -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["fc", "ls-padded", "disk"])
def test_gather_packs_blocks_and_scatter_unpacks_them(where: str, tmp_path: Path) -> None:
    if where == "disk":
        layout = LayoutSpec(FC, 12, 3, 2, 4, 8, torch.float16, alignment=4096)
        source = host_storage(dataclasses.replace(layout, alignment=1))
        fill_random(source, seed=4)
        storage: TensorStorage | DiskStorage = DiskStorage(layout, tmp_path)
        copy_blocks(source, list(range(12)), storage, list(range(12)))
    else:
        storage = make_storage(FC if where == "fc" else LS, 1 if where == "fc" else 256, "kv")
        fill_random(storage, seed=4)
    try:
        ids = [7, 2, 2, 11, 0]
        packed = gather_to_staging(storage, ids)
        assert packed.dtype == torch.uint8 and packed.numel() == 5 * storage.layout.block_bytes
        assert packed.numpy().tobytes() == b"".join(read_block(storage, b) for b in ids)

        target = make_storage(LS, 64, "kv")
        scatter_from_staging(packed, target, [1, 9, 3, 4, 5])
        assert [block_bytes(target, b) for b in (1, 9, 3, 4, 5)] == [
            read_block(storage, b) for b in ids
        ]
        scatter_from_staging(gather_to_staging(target, [9, 1]), storage, [5, 6])
        assert read_block(storage, 5) == read_block(storage, 2)
        assert read_block(storage, 6) == read_block(storage, 7)
    finally:
        storage.close()


def test_gather_into_a_registered_buffer_and_refused_buffers() -> None:
    storage = make_storage(FC, 1, "kv")
    fill_random(storage, seed=5)
    nbytes = storage.layout.block_bytes
    out = torch.full((4 * nbytes,), 7, dtype=torch.uint8)
    packed = gather_to_staging(storage, [3, 1], out=out)
    assert packed.data_ptr() == out.data_ptr() and packed.numel() == 2 * nbytes
    assert out[: 2 * nbytes].numpy().tobytes() == block_bytes(storage, 3) + block_bytes(storage, 1)
    assert bool((out[2 * nbytes :] == 7).all())
    assert gather_to_staging(storage, []).numel() == 0

    with pytest.raises(InvalidInput, match=f"out holds {nbytes} bytes; these blocks need"):
        gather_to_staging(storage, [3, 1], out=out[:nbytes])
    with pytest.raises(InvalidInput, match=r"out must be a uint8 tensor, got torch\.float16"):
        gather_to_staging(storage, [3], out=out.view(torch.float16))
    with pytest.raises(InvalidInput, match="staging must be contiguous"):
        scatter_from_staging(out.reshape(2, -1).t(), storage, [0])
    with pytest.raises(InvalidInput, match="destination block id 4 appears more than once"):
        scatter_from_staging(out, storage, [4, 4])
    with pytest.raises(InvalidInput, match="block id 12 is out of range"):
        gather_to_staging(storage, [12])
