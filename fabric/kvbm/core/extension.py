"""The ``csrc/`` native extension: built once per environment, loaded once per process.

One torch C++ extension holds every native kernel of the fabric: the batched block copy
(``csrc/block_copy.cpp``, exposed by ``fabric.kvbm.tiers.kernels``) and the chained prompt hashes
(``csrc/prompt_hash.cpp``, used by ``fabric.kvbm.core.hashing``). This module owns only building
and loading it; it lives in ``kvbm.core`` so that hashing, the lowest user, can reach it.

* It is compiled with ``torch.utils.cpp_extension.load`` into ``$FABRIC_KERNELS_BUILD_DIR``, else
  ``$XDG_CACHE_HOME/kv-fabric/torch_ext`` (``~/.cache``), never into the checkout, in a
  subdirectory per Python environment and torch build (two virtual environments never rebuild
  each other's library). The set-up scripts build it (``python -m fabric.kvbm.tiers.kernels``,
  about 30 s, once), so serving processes only load it. A ``flock`` keeps two processes from
  building at once; it dies with its holder, so a killed build never wedges the next one.
* ``FABRIC_NATIVE_KERNELS=0`` switches it off; a failed build is logged once at WARNING with the
  reason. Either way every user answers with its pure fallback (same results).

Serving never waits for a compiler: the first ``native()`` of a process loads a library that is
built and current (about a second, torch's import included), and otherwise starts the build on a
background thread and answers ``None`` until that build has loaded (``build`` waits for it: the
set-up, benchmarks and tests call that). torch is imported only when the extension is wanted.
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

from fabric.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_SWITCH = "FABRIC_NATIVE_KERNELS"
"""``0`` / ``false`` / ``off`` / ``no`` disables the native kernels; unset or truthy enables."""
ENV_BUILD_DIR = "FABRIC_KERNELS_BUILD_DIR"
"""Overrides where the extension is built and cached."""

REPO = Path(__file__).resolve().parents[3]
CSRC = REPO / "csrc"
EXTENSION_NAME = "kv_fabric_block_copy"
_HEADERS = (
    CSRC / "prompt_hash.h",
    CSRC / "third_party" / "xxhash" / "xxhash.h",
)
"""Headers of the build: a library older than one of them is stale too."""
_OFF_VALUES = frozenset({"0", "false", "off", "no"})
_ON_VALUES = frozenset({"", "1", "true", "on", "yes"})


def native() -> ModuleType | None:
    """The loaded extension, or None (switched off now, building, or the build failed); never
    waits for a build: the first call loads a built library or starts the build in the background.

    Raises:
        ConfigError: ``FABRIC_NATIVE_KERNELS`` is not a switch value.
    """
    return None if switched_off() else _LOADER.poll()


def build() -> bool:
    """Build (when missing or stale) and load the extension, waiting for it; whether it loaded.

    Raises:
        ConfigError: ``FABRIC_NATIVE_KERNELS`` is not a switch value.
    """
    if switched_off():
        return False
    return _LOADER.wait() is not None


def switched_off() -> bool:
    """Whether ``FABRIC_NATIVE_KERNELS`` switches the extension off (read on every call)."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in _OFF_VALUES:
        return True
    if value not in _ON_VALUES:
        raise ConfigError(
            f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not a switch; use 1 or 0 (true/false)"
        )
    return False


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
                        "native kernels (block copy, prompt hashing) are not built for this "
                        "environment; building them in the background (the fallbacks serve "
                        "meanwhile; `python -m fabric.kvbm.tiers.kernels` builds them ahead)"
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
                "native kernels unavailable, using the slower pure fallbacks (%s=0 silences "
                "this; the full build output is logged at DEBUG): %s",
                ENV_SWITCH,
                _failure_reason(e),
            )
            logger.debug("building the native kernels failed:\n%s", e)
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


def target() -> tuple[str, list[Path], bool]:
    """``(extension name, sources, with CUDA)`` for this machine."""
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    name = f"{EXTENSION_NAME}_cuda" if with_cuda else EXTENSION_NAME
    sources = [CSRC / "block_copy.cpp", CSRC / "prompt_hash.cpp"]
    if with_cuda:
        sources.append(CSRC / "block_copy_cuda.cu")
    return name, sources, with_cuda


def _is_built() -> bool:
    """Whether a library newer than its sources and headers is in this environment's build
    directory."""
    name, sources, _ = target()
    library = build_dir(name) / f"{name}.so"
    try:
        return library.stat().st_mtime >= max(s.stat().st_mtime for s in (*sources, *_HEADERS))
    except OSError:
        return False


def _build_and_load() -> ModuleType:
    from torch.utils import cpp_extension

    name, sources, with_cuda = target()
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing (fabric installed without csrc/?)")
    directory = build_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive(directory / "kv-fabric-build.lock"):
        # torch's own lock is a file created with O_EXCL that a killed build leaves behind, making
        # every later load wait forever; holding our flock, no build of ours is running.
        torch_lock = directory / "lock"
        if torch_lock.exists():
            logger.warning("removing %s left by an interrupted build", torch_lock)
            torch_lock.unlink(missing_ok=True)
        if not _is_built():
            logger.info("building native kernels in %s (about 30 s, once)", directory)
        module: ModuleType = cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=["-O3", *(["-DWITH_CUDA"] if with_cuda else [])],
            extra_cuda_cflags=["-O3"],
            build_directory=str(directory),
            verbose=False,
        )
        return module


def build_dir(name: str) -> Path:
    """Where extension ``name`` is built for this Python environment and torch build."""
    return _build_root() / f"{name}-{_environment_key()}"


def _environment_key() -> str:
    """A short key of this Python environment and torch build: two virtual environments (the
    main one and vLLM's) each keep their own build instead of rebuilding each other's."""
    import torch

    facts = f"{sys.prefix}|{sys.version_info[:2]}|{torch.__version__}"
    return hashlib.sha256(facts.encode()).hexdigest()[:12]


def _build_root() -> Path:
    override = os.environ.get(ENV_BUILD_DIR)
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kv-fabric" / "torch_ext"


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (waiting for other processes)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
