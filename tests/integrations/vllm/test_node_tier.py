"""The node tier under vLLM without vLLM: vLLM-shaped pages (CPU tensors of vLLM-CPU's per-layer
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``) stored into and loaded from a real
node cache (in this process, its segment in real shared memory) through the connector's
``node`` module, byte for byte against ``KvPages.gather``; the slots' compat hash; blocks keyed
by the reference engine's seed never match vLLM's; discovery (``etcd``) through the in-memory
registry; the settings and layouts that are refused."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from page_fixtures import (
    BS,
    GEOMETRY,
    NODE,
    connector_config,
    node_config,
    vllm_hashes,
    vllm_pages,
)

from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registration import WorkerRegistration
from fabric.errors import ConfigError, LayoutMismatch
from fabric.integrations.vllm.node import (
    attach_node_tier,
    check_node_supported,
    node_compat_hash,
    node_geometry,
    node_storage,
)
from fabric.kvbm import LayoutKind, SequenceHash, hash_token_blocks, host_storage
from fabric.node import NodeCacheService, attach_node_cache
from fabric.node.service import node_record


def test_vllm_attaches_with_the_slots_compat_hash_of_a_reference_worker(
    node_namespace: str,
) -> None:
    kvbm = connector_config().kvbm_config(BS)
    assert node_compat_hash(kvbm, GEOMETRY) == node_config(node_namespace).compat_hash
    # The slots' hash is no vLLM seed: the node guards geometry, the keys are vLLM's own.
    assert node_compat_hash(kvbm, GEOMETRY) != GEOMETRY.hash_seed


@pytest.mark.parametrize("backend", ["vllm-cpu", "flashinfer"])
def test_pages_stored_by_one_instance_load_byte_exact_into_another(
    service: NodeCacheService, backend: str
) -> None:
    config = connector_config(node_cache=service.endpoint)
    writer_pages, reader_pages = vllm_pages(1, backend), vllm_pages(2, backend)
    writer_storage, reader_storage = node_storage(writer_pages), node_storage(reader_pages)
    writer = attach_node_tier(config, GEOMETRY, side="w", layout=writer_storage.layout)
    reader = attach_node_tier(config, GEOMETRY, side="r", layout=reader_storage.layout)
    assert writer is not None and reader is not None
    hashes = vllm_hashes(list(range(50, 50 + 4 * BS)))
    assert writer.link.store(hashes, writer_storage, [3, 7, 1, 0]) == 4
    assert reader.link.prefix_length([*hashes, SequenceHash(1)]) == 4
    assert reader.link.load(hashes[:3], reader_storage, lambda m: [9, 4, 5][:m]) == 3
    assert np.array_equal(reader_pages.gather([9, 4, 5]), writer_pages.gather([3, 7, 1]))
    assert np.array_equal(reader_pages.gather([0]), vllm_pages(2, backend).gather([0]))
    stats = service.cache.stats()
    assert stats["committed_blocks"] == 4 and stats["live_pins"] == 0
    writer.close()
    reader.close()


def test_reference_engine_blocks_share_the_segment_but_never_match_vllm_s(
    service: NodeCacheService,
) -> None:
    """A reference worker of the same geometry keys the same tokens with its own seed (the node's
    compat hash, as ``build_kvbm`` does): both engines' blocks sit in one segment, neither's
    lookup finds the other's."""
    tokens = list(range(7, 7 + 3 * BS))
    node_layout = service.cache.geometry
    reference = attach_node_cache(
        service.endpoint,
        identity="reference-worker",
        compat_hash=node_layout.compat_hash,
        layout=node_geometry(GEOMETRY).layout(LayoutKind.FULLY_CONTIGUOUS, 1, BS),
    )
    reference_hashes = hash_token_blocks(tokens, BS, seed=node_layout.compat_hash).sequence_hashes
    src = host_storage(
        node_geometry(GEOMETRY).layout(LayoutKind.FULLY_CONTIGUOUS, 3, BS), pin=False
    )
    assert reference.store(reference_hashes, src, [0, 1, 2]).num_stored == 3
    vllm = attach_node_tier(
        connector_config(node_cache=service.endpoint),
        GEOMETRY,
        side="scheduler",
        layout=node_storage(vllm_pages(0)).layout,
    )
    assert vllm is not None
    assert vllm.link.prefix_length(vllm_hashes(tokens)) == 0
    assert vllm.link.store(vllm_hashes(tokens), node_storage(vllm_pages(0)), [0, 1, 2]) == 3
    assert service.cache.stats()["committed_blocks"] == 6  # one segment, both engines' blocks
    reference.close()
    vllm.close()


def test_etcd_finds_the_node_cache_registered_for_this_node(
    service: NodeCacheService, node_namespace: str
) -> None:
    registry = InMemoryRegistry()
    registration = WorkerRegistration(
        registry,
        node_record(service, node_config(node_namespace), model="fake"),
        ttl_s=5.0,
        namespace=node_namespace,
    ).start()
    config = connector_config(
        node_cache="etcd",
        node_name=NODE,
        etcd_endpoints="http://127.0.0.1:1",  # unused: the registry is given
        namespace=node_namespace,
    )
    pages = node_storage(vllm_pages(3))
    node = attach_node_tier(config, GEOMETRY, side="s", layout=pages.layout, registry=registry)
    assert node is not None and "'test'" in node.where
    hashes = vllm_hashes(list(range(4 * BS)))
    deadline = time.monotonic() + 10
    while node.link.store(hashes, pages, [0, 1, 2, 3]) == 0:  # the directory fills async
        assert time.monotonic() < deadline, "the node cache's record was never found"
        time.sleep(0.6)  # past the link's first retry wait
    assert node.link.prefix_length(hashes) == 4
    other = connector_config(
        node_cache="etcd", node_name="elsewhere", etcd_endpoints="http://127.0.0.1:1"
    )
    lost = attach_node_tier(other, GEOMETRY, side="s2", layout=pages.layout, registry=registry)
    assert lost is not None and lost.link.prefix_length(hashes) == 0  # no node cache there
    node.close()
    lost.close()
    registration.close()
    registry.close()


def test_bad_node_settings_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="etcd_endpoints"):
        connector_config(node_cache="etcd")
    for bad in ("127.0.0.1:7300", "tcp://127.0.0.1:0", "http://h:1", "tcp://"):
        with pytest.raises(ConfigError, match="node_cache="):
            connector_config(node_cache=bad)
    with pytest.raises(ConfigError, match="node_name"):  # the tier settings' own check
        connector_config(node_name="")
    layout = node_storage(vllm_pages(0)).layout
    assert attach_node_tier(connector_config(), GEOMETRY, side="s", layout=layout) is None
    with pytest.raises(ConfigError, match="tensor parallelism"):
        check_node_supported(connector_config(node_cache="tcp://127.0.0.1:5"), world_size=2)
    check_node_supported(connector_config(), world_size=2)  # no node tier: nothing to refuse


def test_layouts_the_node_cannot_hold_are_refused_with_the_reason() -> None:
    with pytest.raises(LayoutMismatch, match="K and V apart"):
        node_storage(vllm_pages(0, "flash-attn"))
    with pytest.raises(LayoutMismatch, match="V 4"):
        node_geometry(dataclasses.replace(GEOMETRY, head_size_v=4))
    with pytest.raises(LayoutMismatch, match="this model's are 64 bytes"):
        node_geometry(dataclasses.replace(GEOMETRY, page_bytes=64))
