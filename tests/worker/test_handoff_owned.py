"""The serving path's handoff pair: ``PrefillHandoff.offer_owned`` and ``DecodeHandoff.read_into``.

The prefill offers every block of a prompt, its partial last block included, and the owner of
their references is released exactly once (TransferDone, Abort, expiry or close); the decode reads
any range of the offer into blocks it owns, byte for byte across layout kinds, and never touches
its pool, on success or failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from prefill_child import fill_blocks, mismatched_blocks

from fabric.errors import InvalidInput, PeerUnavailable
from fabric.kvbm import (
    KvBlockManager,
    KvGeometry,
    LayoutKind,
    MutableBlocks,
    SequenceHash,
    build_kvbm,
    load_kvbm_config,
)
from fabric.signal.messages import TransferDone
from fabric.transfer import LoopbackAgent, LoopbackRegistry
from fabric.worker.handoff import DecodeHandoff, PrefillHandoff

GEOMETRY = KvGeometry(num_layers=3, num_kv_heads=2, head_size=4, dtype=torch.float16)
SEEDS = [SequenceHash(s) for s in (11, 22, 33)]  # the fill of the offered blocks, in order


@dataclass
class Owner:
    """Holds the offered blocks like a request's ``SequenceBlocks``; counts releases."""

    kvbm: KvBlockManager
    blocks: MutableBlocks
    num_releases: int = 0

    def release(self) -> None:
        self.num_releases += 1
        self.kvbm.release(self.blocks)


@dataclass
class Pair:
    prefill: KvBlockManager
    decode: KvBlockManager
    prefill_agent: LoopbackAgent
    offer: PrefillHandoff
    read: DecodeHandoff

    def owner(self) -> Owner:
        blocks = self.prefill.allocate(len(SEEDS))
        assert blocks is not None
        fill_blocks(self.prefill.storage(), blocks.block_ids, SEEDS)
        return Owner(self.prefill, blocks)


@pytest.fixture
def pair() -> Iterator[Pair]:
    loopback = LoopbackRegistry()
    managers, agents = [], []
    for name, kind in (
        ("prefill", LayoutKind.FULLY_CONTIGUOUS),
        ("decode", LayoutKind.LAYER_SEPARATE),
    ):
        config = load_kvbm_config(block_size=4, device_blocks=8, layout=kind)
        kvbm = build_kvbm(config, GEOMETRY, device="cpu")
        agent = LoopbackAgent(name, loopback)
        agent.register(kvbm.storage().buffers())
        managers.append(kvbm)
        agents.append(agent)
    yield Pair(
        managers[0],
        managers[1],
        agents[0],
        PrefillHandoff(managers[0], agents[0], hold_timeout_s=30.0),
        DecodeHandoff(managers[1], agents[1], timeout_s=2.0),
    )
    for agent in agents:
        agent.close()
    for kvbm in managers:
        kvbm.close()


def in_use(kvbm: KvBlockManager) -> int:
    return kvbm.pool().stats().num_in_use


def test_partial_tail_is_read_and_the_owner_released_once(pair: Pair) -> None:
    owner = pair.owner()
    ready = pair.offer.offer_owned("r", owner.blocks.block_ids, owner, first_token=7, num_tokens=10)
    assert (ready.first_token, ready.num_tokens, pair.offer.num_held) == (7, 10, 1)
    target = pair.decode.allocate(2)
    assert target is not None
    pair.read.read_into(ready, 1, target.block_ids)  # blocks 1 and 2 (the partial one)
    assert mismatched_blocks(pair.decode.storage(), target.block_ids, SEEDS[1:]) == []
    assert in_use(pair.decode) == 2  # the caller's allocation, nothing else taken
    pair.decode.release(target)

    assert pair.offer.complete(TransferDone("r", 3))
    assert owner.num_releases == 1 and in_use(pair.prefill) == 0
    assert not pair.offer.complete(TransferDone("r", 3)) and not pair.offer.abort("r")
    assert owner.num_releases == 1


@pytest.mark.parametrize("ending", ["abort", "expire", "close"])
def test_every_ending_releases_the_owner(pair: Pair, ending: str) -> None:
    owner = pair.owner()
    pair.offer.offer_owned("r", owner.blocks.block_ids, owner, first_token=1, num_tokens=9)
    if ending == "abort":
        assert pair.offer.abort("r")
    elif ending == "expire":
        assert pair.offer.expire(float("inf")) == ["r"]
    else:
        pair.offer.close()
    assert owner.num_releases == 1 and pair.offer.num_held == 0 and in_use(pair.prefill) == 0


def test_bad_ranges_and_dead_peers_leave_the_decode_pool_alone(pair: Pair) -> None:
    owner = pair.owner()
    ready = pair.offer.offer_owned("r", owner.blocks.block_ids, owner, first_token=1, num_tokens=9)
    target = pair.decode.allocate(2)
    assert target is not None
    with pytest.raises(InvalidInput, match=r"blocks 2\.\.3 asked for, 3 offered"):
        pair.read.read_into(ready, 2, target.block_ids)
    pair.prefill_agent.close()  # the prefill process died
    with pytest.raises(PeerUnavailable):
        pair.read.read_into(ready, 0, target.block_ids)
    assert in_use(pair.decode) == 2  # still the caller's to release
    pair.decode.release(target)
    pair.offer.close()
