"""A node cache client in its own process, for the multi-process tests (and their shared helpers).

``python tests/node/node_peer.py SPEC COMMAND HASHES`` attaches to the node cache SPEC names (a
JSON object: endpoint, compat_hash, layers, kv_heads, head_size, block_size, identity and
optionally dtype, float16 by default) and:

* ``store``: stores blocks whose bytes are ``pattern(hash)``, prints ``{"stored": n, ...}``;
* ``load``: loads them, prints ``{"loaded": n, "exact": bool}`` (bytes compared with the pattern);
* ``reserve-and-hang``: reserves slots, scribbles into them, prints ``{"slots": [...]}`` and
  sleeps until killed (a writer dying between reserve and commit);
* ``pin-and-hang``: pins the held prefix, prints ``{"pinned": [...]}`` and sleeps until killed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch

from fabric.kvbm import (
    KvGeometry,
    LayoutKind,
    LayoutSpec,
    SequenceHash,
    TensorStorage,
    host_storage,
)
from fabric.node import NodeCacheClient, attach_node_cache


def geometry(spec: dict[str, Any]) -> KvGeometry:
    dtype = getattr(torch, spec.get("dtype", "float16"))
    return KvGeometry(spec["layers"], spec["kv_heads"], spec["head_size"], dtype)


def layout(spec: dict[str, Any], num_blocks: int) -> LayoutSpec:
    return geometry(spec).layout(LayoutKind.FULLY_CONTIGUOUS, num_blocks, spec["block_size"])


def pattern(sequence_hash: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(sequence_hash).integers(0, 256, nbytes, dtype=np.uint8)


def rows(storage: TensorStorage) -> np.ndarray:
    """Block i's bytes as row i (fully contiguous, unpadded layouts)."""
    return storage.tensors[0].view(torch.uint8).reshape(storage.layout.num_blocks, -1).numpy()


def filled_storage(spec: dict[str, Any], hashes: list[int]) -> TensorStorage:
    storage = host_storage(layout(spec, max(1, len(hashes))), pin=False)
    block_rows = rows(storage)
    for i, h in enumerate(hashes):
        block_rows[i] = pattern(h, block_rows.shape[1])
    return storage


def exact(storage: TensorStorage, hashes: list[int], num_blocks: int) -> bool:
    block_rows = rows(storage)
    return all(
        np.array_equal(block_rows[i], pattern(h, block_rows.shape[1]))
        for i, h in enumerate(hashes[:num_blocks])
    )


def attach(spec: dict[str, Any]) -> NodeCacheClient:
    return attach_node_cache(
        spec["endpoint"],
        identity=spec["identity"],
        compat_hash=spec["compat_hash"],
        layout=layout(spec, 1),
        timeout_s=30.0,
    )


def main(argv: list[str]) -> None:
    spec, command, hashes = json.loads(argv[0]), argv[1], [int(h) for h in argv[2].split(",")]
    seq = [SequenceHash(h) for h in hashes]
    ids = list(range(len(hashes)))
    client = attach(spec)
    if command == "store":
        result = client.store(seq, filled_storage(spec, hashes), ids)
        print(json.dumps({"stored": result.num_stored, "held": result.num_held}), flush=True)
    elif command == "load":
        dst = host_storage(layout(spec, len(hashes)), pin=False)
        loaded = client.load(seq, dst, ids)
        print(json.dumps({"loaded": loaded, "exact": exact(dst, hashes, loaded)}), flush=True)
    elif command == "reserve-and-hang":
        reserved = client.reserve(seq)
        slot_rows = rows(client.storage)
        for slot in reserved.slot_ids:
            slot_rows[slot, : slot_rows.shape[1] // 2] = 0xEE  # half a block: a torn write
        print(json.dumps({"slots": reserved.slot_ids}), flush=True)
        time.sleep(3600)
    elif command == "pin-and-hang":
        pinned = client.lookup(seq)
        print(json.dumps({"pinned": pinned.slot_ids}), flush=True)
        time.sleep(3600)
    else:
        raise SystemExit(f"unknown command {command!r}")
    client.close()


if __name__ == "__main__":
    main(sys.argv[1:])
