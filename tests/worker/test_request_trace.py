"""A worker request's KV trace from its opened sequence: the cached prefix tier by tier (device,
host, disk, G4 as the trace names them), then what the service adds; the stats carry it as one
``kv_trace`` string the frontend can decode, with ``onboard_ms``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fabric.kvbm import KvBlockManager, SequenceBlocks, Tier, build_kvbm, load_kvbm_config
from fabric.kvbm.core.layout import KvGeometry
from fabric.signal.framing import PeerId
from fabric.signal.kv_trace import KvSource, KvTrace
from fabric.signal.messages import GenerateRequest
from fabric.worker.request import TIER_TO_SOURCE, WorkerRequest

BS = 4
GEOMETRY = KvGeometry(num_layers=1, num_kv_heads=1, head_size=4, dtype=torch.float32)


@pytest.fixture
def kvbm() -> Iterator[KvBlockManager]:
    config = load_kvbm_config(block_size=BS, device_blocks=8, cpu_cache_blocks=8)
    manager = build_kvbm(config, GEOMETRY)
    yield manager
    manager.close()


def cache(kvbm: KvBlockManager, tokens: list[int]) -> None:
    """Compute-and-register ``tokens`` (full blocks) as a finished request would."""
    with SequenceBlocks.open(kvbm, [*tokens, 0]) as seq:
        assert seq.reserve(len(tokens) + 1)
        seq.commit(len(tokens))


def test_every_tier_has_a_source() -> None:
    assert set(TIER_TO_SOURCE) == set(Tier)
    assert len(set(TIER_TO_SOURCE.values())) == len(Tier)


def test_trace_of_a_device_and_host_prefix_then_recompute(kvbm: KvBlockManager) -> None:
    prompt = list(range(100, 100 + 4 * BS))
    cache(kvbm, prompt)
    device = kvbm.pool(Tier.DEVICE)
    with device.match(kvbm.hash_tokens(prompt).sequence_hashes) as on_device:
        assert kvbm.offload(on_device, Tier.HOST) == 4
    keep = device.match(kvbm.hash_tokens(prompt[:BS]).sequence_hashes)  # block 0 stays
    evict = device.allocate(device.num_free)
    assert evict is not None
    device.release(evict)
    device.release(keep)

    full = [*prompt, 1, 2, 3]
    gen = WorkerRequest(GenerateRequest("r1", full, 4, "", {}, 0), PeerId("client"), None, 0.0)
    gen.seq = SequenceBlocks.open(kvbm, full)
    try:
        gen.trace_cached().add(KvSource.RECOMPUTE, len(full))
        stats = gen.stats.as_dict(len(full), 0)
    finally:
        gen.seq.release()
    expected = f"device:0-{BS},host:{BS}-{4 * BS},recompute:{4 * BS}-{len(full)}"
    assert stats["kv_trace"] == expected
    assert KvTrace.decode(expected).end == len(full)
    assert "onboard_ms" in stats
