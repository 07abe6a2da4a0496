"""``NodeLink.prefix_length``: the held prefix counted without keeping a pin (vLLM's scheduler
side plans node-tier loads with it; its worker side loads)."""

from __future__ import annotations

from collections.abc import Callable

from node_harness import SPEC
from node_peer import filled_storage, layout

from fabric.kvbm import SequenceHash
from fabric.node import NodeCacheService
from fabric.node.link import NodeLink, fixed_endpoint


def test_prefix_length_counts_the_held_prefix_and_leaves_no_pin(
    make_service: Callable[..., NodeCacheService],
) -> None:
    service = make_service()
    link = NodeLink(
        fixed_endpoint(service.endpoint),
        identity="planner",
        compat_hash=service.cache.geometry.compat_hash,
        layout=layout(SPEC, 1),
        retry_s=0.0,
    )
    hashes = [SequenceHash(h) for h in (5, 6, 7)]
    assert link.prefix_length(hashes) == 0  # attaches; nothing held yet
    assert link.store(hashes[:2], filled_storage(SPEC, [5, 6]), [0, 1]) == 2
    assert link.prefix_length(hashes) == 2
    assert link.prefix_length([SequenceHash(9), *hashes]) == 0  # a prefix stops at a miss
    assert link.prefix_length([]) == 0
    stats = service.cache.stats()
    assert stats["live_pins"] == 0 and stats["pinned_blocks"] == 0  # every lookup released
    service.close()
    assert link.prefix_length(hashes) == 0  # gone: a miss, never an error
    assert not link.attached
    link.close()
