"""Native batched byte-chunk copies (``csrc/``), built on first use, with a pure fallback.

``batched_copy(src, dst, src_offsets, dst_offsets, lengths)`` copies ``lengths[i]`` bytes from
``src[src_offsets[i]:]`` to ``dst[dst_offsets[i]:]`` for every chunk ``i`` in one call. It is
how ``copy.py`` moves many small scattered blocks without a Python step per block, and how a
transfer layer can gather scattered blocks into one staging buffer (few NIXL descriptors
instead of one per block).

Two implementations with one contract:

* native: the torch C++ extension in ``csrc/block_copy.cpp`` (plus ``csrc/block_copy_cuda.cu``
  when a CUDA device and toolkit exist), compiled with ``torch.utils.cpp_extension.load`` into
  ``$FABRIC_KERNELS_BUILD_DIR``, else ``$XDG_CACHE_HOME/kv-fabric/torch_ext`` (``~/.cache``),
  never into the checkout, in a subdirectory per Python environment and torch build (two virtual
  environments never rebuild each other's library). The set-up scripts build it (``python -m
  fabric.kvbm.tiers.kernels``, about 30 s, once), so serving processes only load it. A ``flock``
  keeps two processes from building at once; it dies with its holder, so a killed build never
  wedges the next one.
* fallback: numpy (CPU) or per-chunk torch copies (CUDA), used when ``FABRIC_NATIVE_KERNELS=0``,
  when the build fails (logged once at WARNING with the reason), for CUDA tensors when the
  extension was built without CUDA, and while a build is running.

Serving never waits for a compiler: the first ``native_available`` / ``batched_copy`` of a
process loads a library that is built and current (about a second), and otherwise starts the
build on a background thread and answers with the fallback until that build has loaded
(``build`` waits for it: the set-up, benchmarks and tests call that).

Contract (both paths, checked before any byte moves; a violation raises ``InvalidInput`` with the
same message on both paths for chunk errors): ``src`` and ``dst`` are contiguous uint8 tensors
on one device; the offsets and lengths are 1-D contiguous int64 CPU tensors of one length; every
chunk lies inside its tensor; destination chunks are pairwise disjoint; when ``src`` and ``dst``
share memory no destination chunk overlaps a source chunk. Hence the result does not depend on
the order chunks are copied in, and both paths produce identical bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from fabric.errors import ConfigError, InvalidInput

logger = logging.getLogger(__name__)

ENV_SWITCH = "FABRIC_NATIVE_KERNELS"
"""``0`` / ``false`` / ``off`` / ``no`` disables the native kernels; unset or truthy enables."""
ENV_BUILD_DIR = "FABRIC_KERNELS_BUILD_DIR"
"""Overrides where the extension is built and cached."""

REPO = Path(__file__).resolve().parents[3]
CSRC = REPO / "csrc"
_EXTENSION_NAME = "kv_fabric_block_copy"
_OFF_VALUES = frozenset({"0", "false", "off", "no"})
_ON_VALUES = frozenset({"", "1", "true", "on", "yes"})


def native_available() -> bool:
    """Whether ``batched_copy`` runs the compiled extension now (never waits for a build: the
    first call loads a built library or starts the build in the background)."""
    return _native() is not None


def build() -> bool:
    """Build (when missing or stale) and load the extension, waiting for it; whether it loaded.

    Raises:
        ConfigError: ``FABRIC_NATIVE_KERNELS`` is not a switch value.
    """
    if _switched_off():
        return False
    return _LOADER.wait() is not None


def batched_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """Copy ``lengths[i]`` bytes from ``src[src_offsets[i]:]`` to ``dst[dst_offsets[i]:]``.

    See the module docstring for the contract. Copies on CUDA are queued on the current stream
    (native) and are not synchronised here.

    Raises:
        InvalidInput: a tensor has the wrong dtype, layout or device, or a chunk is out of
            bounds, overlaps another destination chunk or (shared memory) a source chunk.
    """
    native = _native()
    if native is not None and (src.device.type == "cpu" or native.with_cuda):
        try:
            native.batched_copy(src, dst, src_offsets, dst_offsets, lengths)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        return
    fallback_batched_copy(src, dst, src_offsets, dst_offsets, lengths)


def fallback_batched_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """``batched_copy`` without the extension: same checks, same messages, same bytes."""
    _check_tensors(src, dst, src_offsets, dst_offsets, lengths)
    so, do, ln = src_offsets.numpy(), dst_offsets.numpy(), lengths.numpy()
    _check_bounds(so, ln, src.numel(), "source")
    _check_bounds(do, ln, dst.numel(), "destination")
    _check_disjoint_destinations(do, ln)
    _check_no_aliasing(src, dst, so, do, ln)
    if src.device.type != "cpu":
        src_flat, dst_flat = src.view(-1), dst.view(-1)
        for s, d, n in zip(so.tolist(), do.tolist(), ln.tolist(), strict=True):
            dst_flat[d : d + n].copy_(src_flat[s : s + n])
        return
    src_bytes, dst_bytes = src.reshape(-1).numpy(), dst.reshape(-1).numpy()
    # Chunks of one length are rows of a sliding-window view of each side (row k starts at byte
    # k); numpy then gathers and scatters them in one fancy-indexing step per distinct length.
    for length in np.unique(ln[ln > 0]).tolist():
        same = ln == length
        src_rows = as_strided(
            src_bytes, (src_bytes.size - length + 1, length), (1, 1), writeable=False
        )
        dst_rows = as_strided(dst_bytes, (dst_bytes.size - length + 1, length), (1, 1))
        dst_rows[do[same]] = src_rows[so[same]]


# ---- checks (mirroring csrc/block_copy.cpp, message for message) ------------------------------


def _check_tensors(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    for name, t in (("src", src), ("dst", dst)):
        if t.dtype != torch.uint8:
            raise InvalidInput(
                f"{name} must be a uint8 tensor, got {t.dtype}; view it with .view(torch.uint8)"
            )
        if not t.is_contiguous():
            raise InvalidInput(f"{name} must be contiguous")
    if src.device != dst.device:
        raise InvalidInput(
            f"src is on {src.device} but dst on {dst.device}; both must be on one device"
        )
    n = lengths.numel()
    for name, t in (
        ("src_offsets", src_offsets),
        ("dst_offsets", dst_offsets),
        ("lengths", lengths),
    ):
        if (
            t.dtype != torch.int64
            or t.dim() != 1
            or not t.is_contiguous()
            or t.device.type != "cpu"
        ):
            raise InvalidInput(
                f"{name} must be a 1-D contiguous int64 CPU tensor, got {t.dtype} of shape "
                f"{list(t.shape)} on {t.device}"
            )
        if t.numel() != n:
            raise InvalidInput(
                "src_offsets, dst_offsets and lengths must have one length; got "
                f"{src_offsets.numel()}, {dst_offsets.numel()} and {n}"
            )


def _check_bounds(offsets: np.ndarray, lengths: np.ndarray, size: int, side: str) -> None:
    bad = np.flatnonzero((lengths < 0) | (offsets < 0) | (offsets > size - lengths))
    if bad.size == 0:
        return
    i = int(bad[0])
    if lengths[i] < 0:
        raise InvalidInput(f"chunk {i} has negative length {lengths[i]}")
    raise InvalidInput(
        f"chunk {i} (offset {offsets[i]}, length {lengths[i]}) lies outside the {side}'s "
        f"{size} bytes"
    )


def _sorted_nonempty(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the non-empty chunks ordered by (start, index)."""
    nonempty = np.flatnonzero(lengths > 0)
    return nonempty[np.argsort(starts[nonempty], kind="stable")]


def _check_disjoint_destinations(dst_offsets: np.ndarray, lengths: np.ndarray) -> None:
    """Sorted by start, disjoint chunks each end by the next one's start; report the first pair
    that does not."""
    order = _sorted_nonempty(dst_offsets, lengths)
    starts = dst_offsets[order]
    ends = starts + lengths[order]
    overlapping = np.flatnonzero(ends[:-1] > starts[1:])
    if overlapping.size == 0:
        return
    k = int(overlapping[0])
    raise InvalidInput(
        f"destination chunks {order[k]} ([{starts[k]}, {ends[k]})) and {order[k + 1]} "
        f"([{starts[k + 1]}, {ends[k + 1]})) overlap; each destination byte may be written once "
        "per call"
    )


def _check_no_aliasing(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: np.ndarray,
    dst_offsets: np.ndarray,
    lengths: np.ndarray,
) -> None:
    src_begin, dst_begin = src.data_ptr(), dst.data_ptr()
    share = (
        src.numel() > 0
        and dst.numel() > 0
        and src_begin < dst_begin + dst.numel()
        and dst_begin < src_begin + src.numel()
    )
    if not share:
        return
    order = _sorted_nonempty(src_offsets, lengths)
    if order.size == 0:
        return
    src_starts = src_offsets[order]
    prefix_max_end = np.maximum.accumulate(src_starts + lengths[order])
    # Destination chunks in source coordinates: the source chunks starting before one ends are
    # the first ``num_before`` sorted ones; it overlaps one of them when they reach past its start.
    starts = dst_offsets + (dst_begin - src_begin)
    num_before = np.searchsorted(src_starts, starts + lengths, side="left")
    reach = prefix_max_end[np.maximum(num_before - 1, 0)]
    overlapping = np.flatnonzero((lengths > 0) & (num_before > 0) & (reach > starts))
    if overlapping.size:
        i = int(overlapping[0])
        raise InvalidInput(
            f"destination chunk {i} ([{dst_offsets[i]}, {dst_offsets[i] + lengths[i]}) of dst) "
            "overlaps a source chunk in the same memory; copy through a separate buffer"
        )


# ---- building and loading the extension -------------------------------------------------------


def _switched_off() -> bool:
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in _OFF_VALUES:
        return True
    if value not in _ON_VALUES:
        raise ConfigError(
            f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not a switch; use 1 or 0 (true/false)"
        )
    return False


def _native() -> ModuleType | None:
    """The loaded extension, or None (switched off now, building, or the build failed)."""
    return None if _switched_off() else _LOADER.poll()


class _Loader:
    """The extension, loaded once per process: at once when a current build exists, else by a
    background build (one per process; ``wait`` joins it). A failure is warned once and final."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._module: ModuleType | None = None
        self._thread: threading.Thread | None = None

    def poll(self) -> ModuleType | None:
        if self._done.is_set():
            return self._module
        with self._lock:
            if self._thread is None and not self._done.is_set():
                if _is_built():
                    self._load()  # about a second: ninja only rechecks the build
                else:
                    logger.info(
                        "native block copy kernels are not built for this environment; "
                        "building them in the background (the fallback copies meanwhile; "
                        "`python -m fabric.kvbm.tiers.kernels` builds them ahead)"
                    )
                    self._start()
        return self._module if self._done.is_set() else None

    def wait(self) -> ModuleType | None:
        with self._lock:
            if self._thread is None and not self._done.is_set():
                self._start()
            thread = self._thread
        if thread is not None:
            thread.join()
        return self._module

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._load, name="kernels-build", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._module = _build_and_load()
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
            logger.warning(
                "native block copy kernels unavailable, using the slower pure fallback (%s=0 "
                "silences this; the full build output is logged at DEBUG): %s",
                ENV_SWITCH,
                _failure_reason(e),
            )
            logger.debug("building the block copy kernels failed:\n%s", e)
        finally:
            self._done.set()


_LOADER = _Loader()


def _failure_reason(e: BaseException) -> str:
    """One line of a build failure: the first compiler error, else the message's last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    if errors:
        return f"{type(e).__name__}: {errors[0]}"
    return f"{type(e).__name__}: {lines[-1] if lines else '(no message)'}"


def _target() -> tuple[str, list[Path], bool]:
    """``(extension name, sources, with CUDA)`` for this machine."""
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    name = f"{_EXTENSION_NAME}_cuda" if with_cuda else _EXTENSION_NAME
    sources = [CSRC / "block_copy.cpp"]
    if with_cuda:
        sources.append(CSRC / "block_copy_cuda.cu")
    return name, sources, with_cuda


def _is_built() -> bool:
    """Whether a library newer than its sources is in this environment's build directory."""
    name, sources, _ = _target()
    library = _build_dir(name) / f"{name}.so"
    try:
        return library.stat().st_mtime >= max(s.stat().st_mtime for s in sources)
    except OSError:
        return False


def _build_and_load() -> ModuleType:
    from torch.utils import cpp_extension

    name, sources, with_cuda = _target()
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing (fabric installed without csrc/?)")
    build_dir = _build_dir(name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir / "kv-fabric-build.lock"):
        # torch's own lock is a file created with O_EXCL that a killed build leaves behind, making
        # every later load wait forever; holding our flock, no build of ours is running.
        torch_lock = build_dir / "lock"
        if torch_lock.exists():
            logger.warning("removing %s left by an interrupted build", torch_lock)
            torch_lock.unlink(missing_ok=True)
        if not _is_built():
            logger.info("building native block copy kernels in %s (about 30 s, once)", build_dir)
        module: ModuleType = cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=["-O3", *(["-DWITH_CUDA"] if with_cuda else [])],
            extra_cuda_cflags=["-O3"],
            build_directory=str(build_dir),
            verbose=False,
        )
        return module


def _build_dir(name: str) -> Path:
    """Where extension ``name`` is built for this Python environment and torch build."""
    return _build_root() / f"{name}-{_environment_key()}"


def _environment_key() -> str:
    """A short key of this Python environment and torch build: two virtual environments (the
    main one and vLLM's) each keep their own build instead of rebuilding each other's."""
    facts = f"{sys.prefix}|{sys.version_info[:2]}|{torch.__version__}"
    return hashlib.sha256(facts.encode()).hexdigest()[:12]


def _build_root() -> Path:
    override = os.environ.get(ENV_BUILD_DIR)
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kv-fabric" / "torch_ext"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (waiting for other processes)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> int:
    """``python -m fabric.kvbm.tiers.kernels``: build and load the kernels now (set-up)."""
    logging.basicConfig(level=logging.INFO, format="[kernels] %(message)s")
    name, _, _ = _target()
    if build():
        print(f"[kernels] native block copy kernels ready in {_build_dir(name)}")
        return 0
    print("[kernels] native block copy kernels unavailable; the fallback copies", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
