"""Both sides of the connector with a node tier, without an engine: one instance's scheduler and
worker store a prompt's full blocks into a real node cache (in this process, real shared
memory); another instance's scheduler reports them as an external hit, its worker copies them
into vLLM-shaped pages (CPU tensors of vLLM-CPU's layout), byte for byte; blocks the node no
longer holds become load errors (a shorter hit, never other bytes). vLLM's request and scheduler
output are stand-ins with the attributes the connector reads.

Runs with the .venv-vllm interpreter (the connector's metadata are vLLM's classes)::

    .venv-vllm/bin/python -m pytest tests/integrations/vllm -q -m "not slow"
"""

from __future__ import annotations

import numpy as np
import pytest
from page_fixtures import BS, vllm_hashes

pytest.importorskip("vllm", reason="run with .venv-vllm (launch/setup_vllm.sh)")

from connector_sides import NUM_BLOCKS, PROMPT, Instance

from fabric.integrations.vllm.jobs import NodeLoad
from fabric.integrations.vllm.metadata import FabricMetadata
from fabric.kvbm import SequenceHash, Tier
from fabric.node import NodeCacheService


def test_a_prefix_one_instance_computed_is_loaded_by_another_from_the_node_tier(
    instances: list[Instance], service: NodeCacheService
) -> None:
    writer, reader = instances
    _, num_external = writer.admit("w", [2, 3, 4, 5, 6, 7])
    assert num_external == 0  # the node starts empty
    meta = writer.step("w", 0)
    assert [len(s.block_ids) for s in meta.node_saves] == [NUM_BLOCKS]
    assert writer.worker.stats.num_node_stored_blocks == NUM_BLOCKS
    assert service.cache.stats()["committed_blocks"] == NUM_BLOCKS

    _, num_external = reader.admit("r", [8, 0, 1, 9, 10, 11])
    assert num_external == NUM_BLOCKS * BS  # every full block; the last token is computed
    assert reader.scheduler.hit_sources("r") == {Tier.NODE: NUM_BLOCKS * BS}
    assert reader.scheduler.stats.num_node_hit_tokens == NUM_BLOCKS * BS
    meta = reader.step("r", num_external)
    (load,) = meta.node_loads
    assert load.block_ids == (8, 0, 1, 9, 10) and not meta.loads and not meta.tier_loads
    assert reader.worker.take_load_errors() == set()
    assert reader.worker.stats.num_node_loaded_blocks == NUM_BLOCKS
    assert np.array_equal(
        reader.pages.gather([8, 0, 1, 9, 10]), writer.pages.gather([2, 3, 4, 5, 6])
    )
    # The loaded blocks are full blocks of this step too: offered again, the node holds them.
    assert reader.worker.stats.num_node_stored_blocks == 0
    assert service.cache.stats()["committed_blocks"] == NUM_BLOCKS
    assert service.cache.stats()["live_pins"] == 0


def test_blocks_the_node_lost_since_the_lookup_are_load_errors_from_the_first(
    instances: list[Instance],
) -> None:
    writer, reader = instances
    writer.admit("w", [2, 3, 4, 5, 6, 7])
    writer.step("w", 0)
    hashes = vllm_hashes(PROMPT[: NUM_BLOCKS * BS])
    before = reader.pages.gather([0, 1, 2, 3, 4])
    # The fourth block vanished (evicted) between the scheduler's lookup and the worker's load.
    gone = (*hashes[:3], SequenceHash(hashes[3] ^ 1), hashes[4])
    reader.worker.start_load_kv(FabricMetadata(node_loads=[NodeLoad("r", (0, 1, 2, 3, 4), gone)]))
    assert reader.worker.take_load_errors() == {3, 4}
    assert reader.worker.stats.num_node_loaded_blocks == 3
    assert np.array_equal(reader.pages.gather([0, 1, 2]), writer.pages.gather([2, 3, 4]))
    assert np.array_equal(reader.pages.gather([3, 4]), before[3:])  # never other bytes


def test_a_node_cache_that_is_gone_is_a_miss_and_planned_loads_become_load_errors(
    instances: list[Instance], service: NodeCacheService
) -> None:
    writer, reader = instances
    writer.admit("w", [2, 3, 4, 5, 6, 7])
    writer.step("w", 0)
    _, num_external = reader.admit("r", [0, 1, 2, 3, 4, 5])
    assert num_external == NUM_BLOCKS * BS
    service.close()  # between the lookup and the load
    meta = reader.step("r", num_external)
    assert len(meta.node_loads) == 1
    assert reader.worker.take_load_errors() == {0, 1, 2, 3, 4}  # vLLM recomputes them
    _, num_external = reader.admit("r2", [6, 7, 8, 9, 10, 11])
    assert num_external == 0  # a miss, never an error
