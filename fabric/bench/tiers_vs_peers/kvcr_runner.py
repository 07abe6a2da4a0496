"""kvcr's host (local DRAM) or disk (G3, POSIX) tier under ``measure.measure_path``.

Run by ``tiers-vs-peers`` with ``.venv-kvcr``'s python (``launch/setup_peers.sh``); imports kvcr,
numpy and ``measure`` (this directory), never ``fabric``. Prints one JSON line: the row's figures
and kvcr's version. Driven through kvcr's public API as ``../shared/peer-recipes/kvcr_*.py`` do:

* the engine's KV is one framework region of 4 KiB-aligned anonymous memory (``mmap``; kvcr's G3
  opens its file with O_DIRECT), one element per block;
* store: ``deposit({key: [MemoryRef(element i)]})`` until ``poll_completed`` reports it: a NIXL
  copy into kvcr's DRAM pool (backend UCX, kvcr's default);
* load: ``deliver`` into the same elements (from DRAM, or for G3-resident keys straight from the
  file, as kvcr does when a key is not in DRAM).

kvcr's G3 has no store of its own: blocks reach it when the DRAM pool is full and its G3 policy
(``G3LRUPolicy``, chosen when G3 is configured) moves the least recent one there, one block at a
time. A deposit never evicts its own keys, so one deposit must fit the DRAM pool. The disk tier
therefore runs with a DRAM pool of ``SPILL_SLOTS`` blocks kept full (filler blocks deposited
before the clock starts), and a store deposits ``SPILL_SLOTS`` blocks at a time, each deposit
waited for: in that steady state every stored block costs one DRAM copy plus the spill of an
older block to the file, which is what a store to kvcr's disk tier costs. Before each timed load
one deposit of ``SPILL_SLOTS`` filler blocks (untimed) moves every measured block to G3, so the
load reads the file.

The request dicts (``{BlockKey: [MemoryRef]}``) are built in ``stage``, before the clock
starts, as every system's arguments are. Waiting on an operation polls ``poll_completed`` with
20 us sleeps (kvcr's progress thread sleeps 1 ms when idle: part of its latency).
"""

from __future__ import annotations

import mmap
import socket
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import measure  # this directory: run as a script
import numpy as np

SPILL_SLOTS = 64
"""DRAM blocks of kvcr's disk tier configuration and blocks per deposit there (module doc)."""
TIMEOUT_MS = 600_000
POLL_S = 20e-6
AGENT = "tiers-vs-peers-kvcr"


class KvcrPath:
    """``measure.TierPath`` over one kvcr instance."""

    def __init__(self, plan: measure.Plan, tier: str, workdir: Path) -> None:
        from kvcr import KVCR, KVCRBindings
        from kvcr.config import G3Options, KVCRBackendConfigs, KVCRConfig, LocalDramOptions
        from kvcr.types import RegionDescriptor

        size = plan.block_bytes
        self.disk = tier == "disk"
        rows = plan.num_blocks
        self._fw_map = mmap.mmap(-1, rows * size)
        self.fw = np.frombuffer(self._fw_map, dtype=np.uint8).reshape(rows, size)
        capacity = measure.capacity_blocks(plan)
        self._slots = min(SPILL_SLOTS, rows)
        dram_blocks = self._slots if self.disk else capacity
        self._pool_map = mmap.mmap(-1, dram_blocks * size)
        pool = np.frombuffer(self._pool_map, dtype=np.uint8)
        pool[:: mmap.PAGESIZE] = 0  # fault the pool in, as the framework buffer is by staging
        g3 = None
        if self.disk:
            g3 = G3Options(  # room for the blocks of two batches and their fillers
                paths=(workdir / "kvcr-g3.bin",),
                capacity_bytes_per_file=2 * (capacity + self._slots) * size,
                backend="POSIX",
            )
        self.kvcr = KVCR(
            KVCRConfig(
                nixl_agent_name=AGENT,
                pool_layouts=[("kv", size)],
                operation_timeout_ms=TIMEOUT_MS,
                abandon_timeout_ms=2 * TIMEOUT_MS,
                nixl_listen_port=_free_port(),
            ),
            KVCRBindings(
                request_pin=lambda keys: 0,
                poll_pin_results=lambda: [],
                release_pin=lambda handle: True,
            ),
            KVCRBackendConfigs(
                framework_regions=[
                    RegionDescriptor(
                        mem_type="DRAM", addr=_address(self.fw), count=rows, size=size, label="kv"
                    )
                ],
                local_dram=LocalDramOptions(pools=[("kv", _address(pool), pool.nbytes)]),
                g3=g3,
            ),
        )
        self._num_fillers = 0
        self._chunks: list[dict[Any, list[Any]]] = []
        if self.disk:
            self._push_to_disk()

    # -- measure.TierPath ----------------------------------------------------------------------

    def stage(self, keys: Sequence[int], data: np.ndarray) -> None:
        self.fw[: len(keys)] = data
        step = self._slots if self.disk else len(keys)
        self._chunks = [
            self._refs(keys[start : start + step], first=start)
            for start in range(0, len(keys), step)
        ]

    def store(self, keys: Sequence[int]) -> None:
        for chunk in self._chunks:
            self._run("deposit", self.kvcr.deposit(chunk), len(chunk))

    def clear(self, keys: Sequence[int]) -> None:
        self.fw[: len(keys)] = 0
        if self.disk:
            self._push_to_disk()

    def load(self, keys: Sequence[int]) -> None:
        refs = {key: ref for chunk in self._chunks for key, ref in chunk.items()}
        self._run("deliver", self.kvcr.deliver(refs), len(keys))

    def loaded(self, keys: Sequence[int]) -> np.ndarray:
        return self.fw[: len(keys)]

    def finish(self, keys: Sequence[int]) -> None:
        pass  # deposit without no_evict and deliver leave no claim to release

    # -- internals -----------------------------------------------------------------------------

    def close(self) -> None:
        self.kvcr.close()

    def _refs(
        self, keys: Sequence[int], *, first: int = 0, prefix: bytes = b"m"
    ) -> dict[Any, list[Any]]:
        """``{key: [element first + i]}`` for the ``i``-th key."""
        from kvcr.types import BlockKey, MemoryRef

        return {
            BlockKey(prefix + str(key).encode()): [
                MemoryRef(end_point_name=AGENT, label="kv", element_index=first + i)
            ]
            for i, key in enumerate(keys)
        }

    def _push_to_disk(self) -> None:
        """Deposit a DRAM pool's worth of new filler blocks: whatever DRAM held moves to G3."""
        keys = range(self._num_fillers, self._num_fillers + self._slots)
        self._num_fillers += self._slots
        self._run("filler deposit", self.kvcr.deposit(self._refs(keys, prefix=b"f")), len(keys))

    def _run(self, what: str, handle: int, expected: int) -> None:
        """Wait for operation ``handle``; raise unless every entry succeeded."""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            for done, results in self.kvcr.poll_completed():
                if done != handle:
                    continue
                ok = sum(1 for r in results.values() if r.success)
                if ok != expected:
                    statuses = sorted({str(r.status) for r in results.values()})
                    raise RuntimeError(f"kvcr {what}: {ok} of {expected} succeeded ({statuses})")
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"kvcr {what} did not complete in {TIMEOUT_MS / 1000:.0f} s")


def _free_port() -> int:
    """A port free on 127.0.0.1 now (kvcr's NIXL agent must listen on one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _address(array: np.ndarray) -> int:
    address: int = array.ctypes.data
    return address


def main() -> None:
    args = measure.runner_parser(__doc__ or "").parse_args()
    plan = measure.plan_of(args)
    path = KvcrPath(plan, args.tier, Path(args.workdir))
    row = measure.measure_and_close(path, plan, log=measure.stderr_log(f"kvcr_{args.tier}"))
    row["version"] = f"kvcr {version('kvcr')}, nixl {version('nixl')}"
    measure.emit(row)


if __name__ == "__main__":
    main()
