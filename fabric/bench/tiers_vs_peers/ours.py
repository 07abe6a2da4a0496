"""Our three tier paths as ``measure.TierPath``s, each through the fabric's public API.

* ``fabric_host`` (kvbm G2) and ``fabric_disk`` (kvbm G3, one O_DIRECT file): a
  ``KvBlockManager`` built by ``build_kvbm`` whose device pool (G1, CPU memory here) is the
  engine's KV. ``stage`` runs a fake prefill: allocate device blocks, write the bytes, register
  them under the keys (as sequence hashes). Store: ``offload(device blocks, HOST | DISK)``:
  allocate in the tier, one ``copy_blocks``, register. ``clear``: release, then
  ``reset_cache`` the device pool, so the device holds none of the keys. Load:
  ``match_and_onboard(keys)``: match through the tiers, allocate device blocks, one copy, register.
  The loaded bytes are read at the device block ids the onboard returned.
* ``fabric_node``: the node cache service as ``fabric serve node-cache`` runs it (``python -m
  fabric.node``, its own process, supervised by ``fabric.supervise``; its segment in
  /dev/shm), and this process attached as a worker is (``attach_node_cache``). The engine's KV is
  a host storage of the batch's blocks. Store: ``NodeCacheClient.store``: a reserve round trip,
  one copy into the segment, a commit round trip. Load: ``NodeCacheClient.load``: a full hit
  reads through the segment's slot index (no round trip: probe, one copy out, the generations
  checked again), anything else takes a lookup round trip (pins), one copy out, a one-way unpin.

Every path copies with one torch thread, as a worker with ``--threads 1`` does. A key's sequence
hash (``sequence_hashes``) is computed in ``stage``: no hashing is timed (the engine hashed the
request's tokens when it arrived).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from fabric.bench.deployment import STARTUP_S
from fabric.bench.tiers_vs_peers.measure import (
    BLOCK_TOKENS,
    Plan,
    capacity_blocks,
    kv_shape,
)
from fabric.errors import FabricError
from fabric.kvbm import (
    ImmutableBlocks,
    KvBlockManager,
    KvGeometry,
    LayoutKind,
    SequenceHash,
    TensorStorage,
    Tier,
    build_kvbm,
    host_storage,
    load_kvbm_config,
)
from fabric.node import NodeCacheClient, attach_node_cache
from fabric.supervise import Child, Progress, ReadyLine, start_process, stop_processes, wait_ready


def geometry(block_bytes: int) -> KvGeometry:
    """The fp16 geometry whose 16-token blocks are ``block_bytes`` long (``measure.kv_shape``)."""
    layers, heads, head_size = kv_shape(block_bytes)
    return KvGeometry(layers, heads, head_size, torch.float16)


def block_rows(storage: TensorStorage) -> np.ndarray:
    """A fully contiguous storage's bytes as ``num_blocks x block_bytes`` (aliasing it)."""
    layout = storage.layout
    raw = storage.tensors[0].view(torch.uint8).reshape(layout.num_blocks, layout.block_stride)
    return raw[:, : layout.block_bytes].numpy()


def sequence_hashes(keys: Sequence[int]) -> list[SequenceHash]:
    """The keys as sequence hashes: xxh3-64 of each key, so they spread like real chained
    hashes do (consecutive ints would cluster in hash tables keyed by their low bits)."""
    return [SequenceHash(xxhash.xxh3_64_intdigest(k.to_bytes(8, "little"))) for k in keys]


class KvbmTierPath:
    """``fabric_host`` (``Tier.HOST``) or ``fabric_disk`` (``Tier.DISK``): see the module doc."""

    def __init__(self, plan: Plan, tier: Tier, workdir: Path) -> None:
        if tier not in (Tier.HOST, Tier.DISK):
            raise FabricError(f"no kvbm tier path for {tier.name}")
        capacity = capacity_blocks(plan)
        config = load_kvbm_config(
            block_size=BLOCK_TOKENS,
            device_blocks=plan.num_blocks,
            cpu_cache_gb=0.0,
            cpu_cache_blocks=capacity if tier is Tier.HOST else 0,
            disk_cache_gb=0.0,
            disk_cache_blocks=capacity if tier is Tier.DISK else 0,
            disk_cache_dir=workdir,
            disk_admit_after=1,  # store on the first offload: the filter is not measured
        )
        self.tier = tier
        self.kvbm: KvBlockManager = build_kvbm(config, geometry(plan.block_bytes), device="cpu")
        device = self.kvbm.storage(Tier.DEVICE)
        assert isinstance(device, TensorStorage)  # device_storage on the CPU
        self.rows = block_rows(device)
        self._hashes: list[SequenceHash] = []
        self._stored: ImmutableBlocks | None = None
        self._loaded: ImmutableBlocks | None = None

    def stage(self, keys: Sequence[int], data: np.ndarray) -> None:
        blocks = self.kvbm.allocate(len(keys))
        if blocks is None:
            raise FabricError(f"the device pool has no {len(keys)} free blocks")
        self._hashes = sequence_hashes(keys)
        self.kvbm.release_match(self.kvbm.match(self._hashes))  # the request's lookup on arrival
        self.rows[blocks.block_ids] = data
        blocks.advance(blocks.capacity)
        self._stored = self.kvbm.register(blocks, self._hashes)

    def store(self, keys: Sequence[int]) -> None:
        assert self._stored is not None
        stored = self.kvbm.offload(self._stored, self.tier)
        if stored != len(keys):
            raise FabricError(f"offload to {self.tier.name} stored {stored} of {len(keys)}")

    def clear(self, keys: Sequence[int]) -> None:
        assert self._stored is not None
        self.kvbm.release(self._stored)
        self._stored = None
        self._drop_device_cache()

    def load(self, keys: Sequence[int]) -> None:
        self._loaded = self.kvbm.match_and_onboard(self._hashes)
        if len(self._loaded) != len(keys):
            raise FabricError(f"onboarded {len(self._loaded)} of {len(keys)} blocks")

    def loaded(self, keys: Sequence[int]) -> np.ndarray:
        assert self._loaded is not None
        rows: np.ndarray = self.rows[self._loaded.block_ids]
        return rows

    def finish(self, keys: Sequence[int]) -> None:
        assert self._loaded is not None
        self.kvbm.release(self._loaded)
        self._loaded = None
        self._drop_device_cache()

    def close(self) -> None:
        self.kvbm.close()

    def _drop_device_cache(self) -> None:
        """Forget every device block (the engine's copy) and zero the device memory."""
        if not self.kvbm.pool(Tier.DEVICE).reset_cache():
            raise FabricError("device blocks are still referenced")
        self.rows[:] = 0


class NodeTierPath:
    """``fabric_node``: a node cache process and this process attached to it (module doc)."""

    def __init__(
        self, plan: Plan, workdir: Path, *, progress: Progress, name: str = "node-cache"
    ) -> None:
        geo = geometry(plan.block_bytes)
        model_dir = workdir / "model"
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(_llama_config(geo)))
        cmd = [sys.executable, "-m", "fabric.node", f"--model={model_dir}"]
        cmd += [f"--blocks={capacity_blocks(plan)}", f"--block-size={BLOCK_TOKENS}"]
        cmd += [f"--node=tiers-vs-peers-{os.getpid()}", "--namespace=bench"]
        self._children: list[Child] = [start_process(name, cmd, workdir, progress=progress)]
        self._progress = progress
        self.storage: TensorStorage | None = None
        self.client: NodeCacheClient | None = None
        self._hashes: list[SequenceHash] = []
        try:
            ready = ReadyLine(self._children[0], progress)
            wait_ready(self._children, ready, STARTUP_S)
            assert ready.line is not None
            layout = geo.layout(LayoutKind.FULLY_CONTIGUOUS, plan.num_blocks, BLOCK_TOKENS)
            self.storage = host_storage(layout, pin=False)
            self.rows = block_rows(self.storage)
            self.rows[:] = 0  # fault the engine buffers in, as a running engine's are
            self.client = attach_node_cache(
                str(ready.line["endpoint"]),
                identity=f"tiers-vs-peers-{os.getpid()}",
                compat_hash=int(str(ready.line["compat_hash"])),
                layout=layout,
            )
        except BaseException:
            self.close()
            raise

    def stage(self, keys: Sequence[int], data: np.ndarray) -> None:
        self._hashes = sequence_hashes(keys)
        self.rows[: len(keys)] = data

    def store(self, keys: Sequence[int]) -> None:
        assert self.client is not None and self.storage is not None
        result = self.client.store(self._hashes, self.storage, range(len(keys)))
        if result.num_stored != len(keys):
            raise FabricError(f"the node cache stored {result} of {len(keys)} blocks")

    def clear(self, keys: Sequence[int]) -> None:
        self.rows[: len(keys)] = 0

    def load(self, keys: Sequence[int]) -> None:
        assert self.client is not None and self.storage is not None
        num_loaded = self.client.load(self._hashes, self.storage, range(len(keys)))
        if num_loaded != len(keys):
            raise FabricError(f"the node cache loaded {num_loaded} of {len(keys)} blocks")

    def loaded(self, keys: Sequence[int]) -> np.ndarray:
        rows: np.ndarray = self.rows[: len(keys)]
        return rows

    def finish(self, keys: Sequence[int]) -> None:
        pass  # the load unpinned already

    def close(self) -> None:
        """Detach, then stop the node cache (it unlinks its segment)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.storage is not None:
            self.storage.close()
            self.storage = None
        stop_processes(self._children, progress=self._progress)
        self._children = []


def _llama_config(geo: KvGeometry) -> dict[str, Any]:
    """A Llama ``config.json`` with ``geo``'s KV geometry (only the node cache reads it)."""
    return {
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": geo.num_kv_heads * geo.head_size,
        "intermediate_size": 4 * geo.num_kv_heads * geo.head_size,
        "num_hidden_layers": geo.num_layers,
        "num_attention_heads": geo.num_kv_heads,
        "num_key_value_heads": geo.num_kv_heads,
        "head_dim": geo.head_size,
        "dtype": "float16",
    }
