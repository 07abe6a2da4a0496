"""LMCache's engine with its ``local_cpu`` backend under ``measure.measure_path``.

Run by ``tiers-vs-peers`` with ``.venv-lmcache``'s python (``launch/setup_peers.sh``); imports
LMCache, torch, numpy and ``measure`` (this directory), never ``fabric``. Prints one JSON line.
Driven as ``../shared/peer-recipes/lmcache_cpu.py`` does: ``LMCacheEngineBuilder.get_or_create``
with a small CPU ``GPUConnectorInterface`` (LMCache's vLLM connector needs CUDA), then

* the engine's KV is one tensor ``[2, layers, tokens, kv_heads * head_size]`` fp16 (K/V first,
  as LMCache's KV_2LTD format), block ``i`` being tokens ``[16 i, 16 i + 16)`` of every layer;
  LMCache's chunk size is set to the block's 16 tokens, so one chunk is one block;
* store: ``engine.store(tokens, kv=...)``: hashes the token ids into chained chunk keys,
  allocates one memory object per chunk in its CPU pool, copies the chunk out of the engine
  tensor (the connector's ``batched_from_gpu``: one strided ``copy_`` per chunk) and puts them;
* load: ``engine.retrieve(tokens, kv=...)``: hashes again, looks the chunks up, copies each
  back (``batched_to_gpu``); the mask it returns must cover every token.

Block ``i`` of a call holds the token ids ``16 k .. 16 k + 15`` of its key ``k``, so keys never
share a chunk. One torch thread, as every system here. LMCache's INFO log line per store is
silenced, and so is the warning it logs for every allocation that has to evict first
(``LMCACHE_LOG_LEVEL=ERROR``): its logging is not part of what is measured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import measure  # this directory: run as a script
import numpy as np

os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
os.environ.setdefault("PYTHONHASHSEED", "0")

# LMCache reads its log level at import: the two variables above come first.
import torch
from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata

CHUNK = measure.BLOCK_TOKENS
INSTANCE = "tiers-vs-peers"


class CpuConnector(GPUConnectorInterface):  # type: ignore[misc]  # Any where LMCache is absent
    """Copies chunks between the engine tensor ``kw["kv"]`` ([2, L, T, H*D]) and memory objects."""

    def __init__(self, layers: int, hidden: int) -> None:
        self.layers = layers
        self.hidden = hidden

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.layers, num_tokens, self.hidden])

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kw: Any) -> None:
        memory_obj.tensor.copy_(kw["kv"][:, :, start:end])

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kw: Any) -> None:
        kw["kv"][:, :, start:end].copy_(memory_obj.tensor)

    def batched_from_gpu(
        self, memory_objs: Any, starts: Sequence[int], ends: Sequence[int], **kw: Any
    ) -> None:
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(memory_obj, start, end, **kw)

    def batched_to_gpu(
        self, memory_objs: Any, starts: Sequence[int], ends: Sequence[int], **kw: Any
    ) -> None:
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(memory_obj, start, end, **kw)


class LmcachePath:
    """``measure.TierPath`` over one LMCache engine (local_cpu)."""

    def __init__(self, plan: measure.Plan) -> None:
        layers, heads, head_size = measure.kv_shape(plan.block_bytes)
        self.layers, self.hidden = layers, heads * head_size
        self.block_bytes = plan.block_bytes
        self.kv = torch.zeros(2, layers, plan.num_blocks * CHUNK, self.hidden, dtype=torch.float16)
        pool_gb = measure.capacity_blocks(plan) * plan.block_bytes / 2**30  # LMCache: GiB
        config = LMCacheEngineConfig.from_defaults(
            chunk_size=CHUNK, local_cpu=True, max_local_cpu_size=pool_gb, save_unfull_chunk=False
        )
        metadata = LMCacheMetadata(
            model_name="tiers-vs-peers",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.float16,
            kv_shape=(layers, 2, CHUNK, heads, head_size),
            role="worker",
        )
        self.engine = LMCacheEngineBuilder.get_or_create(
            INSTANCE,
            config,
            metadata,
            CpuConnector(layers, self.hidden),
            mock_up_broadcast_fn,
            mock_up_broadcast_object_fn,
        )
        self.engine.post_init()
        self._tokens = torch.empty(0, dtype=torch.long)

    # -- measure.TierPath ----------------------------------------------------------------------

    def stage(self, keys: Sequence[int], data: np.ndarray) -> None:
        blocks = torch.from_numpy(data.view(np.float16)).view(
            len(keys), 2, self.layers, CHUNK, self.hidden
        )
        self._engine_view(len(keys)).copy_(blocks)
        self._tokens = _tokens(keys)

    def store(self, keys: Sequence[int]) -> None:
        self.engine.store(self._tokens, kv=self.kv)

    def clear(self, keys: Sequence[int]) -> None:
        self.kv[:, :, : len(keys) * CHUNK].zero_()

    def load(self, keys: Sequence[int]) -> None:
        mask = self.engine.retrieve(self._tokens, kv=self.kv)
        found = int(mask.sum())
        if found != len(keys) * CHUNK:
            raise RuntimeError(f"LMCache retrieved {found} of {len(keys) * CHUNK} tokens")

    def loaded(self, keys: Sequence[int]) -> np.ndarray:
        blocks = self._engine_view(len(keys)).contiguous()
        return blocks.view(torch.uint8).reshape(len(keys), self.block_bytes).numpy()

    def finish(self, keys: Sequence[int]) -> None:
        pass  # retrieve holds nothing once it returned (no lookup pins were taken)

    # -- internals -----------------------------------------------------------------------------

    def _engine_view(self, num_blocks: int) -> torch.Tensor:
        """The engine tensor's first ``num_blocks`` blocks as [block, 2, L, CHUNK, H*D]."""
        used = self.kv[:, :, : num_blocks * CHUNK]
        blocks: torch.Tensor = used.view(2, self.layers, num_blocks, CHUNK, self.hidden)
        return blocks.permute(2, 0, 1, 3, 4)

    def close(self) -> None:
        LMCacheEngineBuilder.destroy(INSTANCE)


def _tokens(keys: Sequence[int]) -> torch.Tensor:
    """The token ids of ``keys``' blocks: ``16 k .. 16 k + 15`` for key ``k``."""
    starts = torch.tensor(keys, dtype=torch.long).unsqueeze(1) * CHUNK
    tokens: torch.Tensor = (starts + torch.arange(CHUNK)).reshape(-1)
    return tokens


def main() -> None:
    args = measure.runner_parser(__doc__ or "").parse_args()
    if args.tier != "host":
        raise SystemExit("lmcache_runner measures LMCache's local_cpu backend: --tier host")
    torch.set_num_threads(1)
    plan = measure.plan_of(args)
    row = measure.measure_and_close(LmcachePath(plan), plan, log=measure.stderr_log("lmcache_cpu"))
    row["version"] = f"lmcache {version('lmcache')}, torch {torch.__version__}"
    measure.emit(row)


if __name__ == "__main__":
    main()
