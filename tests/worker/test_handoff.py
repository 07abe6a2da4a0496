"""The prefill -> decode handoff in one process: two KvBlockManagers, loopback agents.

Bytes are checked against the deterministic fill of ``prefill_child`` (what the two-process test
uses too); reads are counted by wrapping the decode's agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from prefill_child import fake_first_token, fill_blocks, mismatched_blocks

from fabric.errors import InvalidInput, PeerUnavailable, ProtocolMismatch, TransferTimeout
from fabric.kvbm import (
    BlockStored,
    KvBlockManager,
    KvGeometry,
    LayoutKind,
    RecordingSink,
    SequenceHash,
    build_kvbm,
    load_kvbm_config,
)
from fabric.signal.messages import DEFAULT_MAX_BYTES, BlocksReady, TransferDone, decode, encode
from fabric.transfer import LoopbackAgent, LoopbackRegistry, RegionList, Transfer
from fabric.worker.handoff import DecodeHandoff, DecodePoolFull, PrefillHandoff

FC, LS = LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE
GEOMETRY = KvGeometry(num_layers=3, num_kv_heads=2, head_size=4, dtype=torch.float16)
BS = 4
HOLD_S = 30.0
TIMEOUT_S = 2.0


class CountingAgent(LoopbackAgent):
    """A loopback agent that records the local regions of every read it posts."""

    def __init__(self, name: str, registry: LoopbackRegistry) -> None:
        super().__init__(name, registry)
        self.reads: list[RegionList] = []

    def read(
        self, local: RegionList, remote: RegionList, peer: str, *, notify: bytes | None = None
    ) -> Transfer:
        self.reads.append(local)
        return super().read(local, remote, peer, notify=notify)

    @property
    def bytes_read(self) -> int:
        return sum(r.nbytes for r in self.reads)


@dataclass
class Prefill:
    kvbm: KvBlockManager
    agent: LoopbackAgent
    handoff: PrefillHandoff

    def serve(self, request_id: str, tokens: list[int]) -> BlocksReady:
        """A fake prefill: fill, register and offer the prompt's blocks (the handoff holds them)."""
        hashes = self.kvbm.hash_tokens(tokens).sequence_hashes
        blocks = self.kvbm.allocate(len(hashes))
        assert blocks is not None
        fill_blocks(self.kvbm.storage(), blocks.block_ids, hashes)
        blocks.advance(blocks.capacity)
        with self.kvbm.register(blocks, hashes) as registered:
            return self.handoff.offer(
                request_id,
                registered,
                first_token=fake_first_token(hashes),
                num_tokens=len(tokens),
            )

    @property
    def num_in_use(self) -> int:
        return self.kvbm.pool().stats().num_in_use


@dataclass
class Decode:
    kvbm: KvBlockManager
    agent: CountingAgent
    handoff: DecodeHandoff
    events: RecordingSink

    def hashes(self, tokens: list[int]) -> list[SequenceHash]:
        return self.kvbm.hash_tokens(tokens).sequence_hashes

    @property
    def num_in_use(self) -> int:
        return self.kvbm.pool().stats().num_in_use


def make_kvbm(
    kind: LayoutKind, *, num_blocks: int = 16, salt: str | None = None, events: RecordingSink
) -> KvBlockManager:
    config = load_kvbm_config(block_size=BS, device_blocks=num_blocks, layout=kind, salt=salt)
    return build_kvbm(config, GEOMETRY, events=events, device="cpu")


@pytest.fixture
def loopback() -> LoopbackRegistry:
    return LoopbackRegistry()


@pytest.fixture(params=[(FC, LS), (LS, FC)], ids=["fc-ls", "ls-fc"])
def kinds(request: pytest.FixtureRequest) -> tuple[LayoutKind, LayoutKind]:
    return request.param


@pytest.fixture
def make_prefill(loopback: LoopbackRegistry, kinds: tuple[LayoutKind, LayoutKind]) -> Iterator:
    made: list[Prefill] = []

    def make(*, salt: str | None = None) -> Prefill:
        kvbm = make_kvbm(kinds[0], salt=salt, events=RecordingSink())
        agent = LoopbackAgent(f"prefill-{len(made)}", loopback)
        agent.register(kvbm.storage().buffers())
        side = Prefill(kvbm, agent, PrefillHandoff(kvbm, agent, hold_timeout_s=HOLD_S))
        made.append(side)
        return side

    yield make
    for side in made:
        side.handoff.close()
        side.kvbm.pool().check_invariants()
        side.agent.close()
        side.kvbm.close()


@pytest.fixture
def prefill(make_prefill) -> Prefill:
    return make_prefill()


@pytest.fixture
def make_decode(loopback: LoopbackRegistry, kinds: tuple[LayoutKind, LayoutKind]) -> Iterator:
    made: list[Decode] = []

    def make(*, num_blocks: int = 16, timeout_s: float = TIMEOUT_S) -> Decode:
        events = RecordingSink()
        kvbm = make_kvbm(kinds[1], num_blocks=num_blocks, events=events)
        agent = CountingAgent(f"decode-{len(made)}", loopback)
        agent.register(kvbm.storage().buffers())
        side = Decode(kvbm, agent, DecodeHandoff(kvbm, agent, timeout_s=timeout_s), events)
        made.append(side)
        return side

    yield make
    for side in made:
        side.kvbm.pool().check_invariants()
        assert side.agent.num_live_transfers == 0
        side.agent.close()
        side.kvbm.close()


@pytest.fixture
def decode_side(make_decode) -> Decode:
    return make_decode()


def tokens_of(num_blocks: int, start: int = 0, tail: int = 0) -> list[int]:
    """A prompt of ``num_blocks`` full blocks plus ``tail`` tokens of a partial block."""
    return list(range(start, start + num_blocks * BS + tail))


def stored_events(decode: Decode) -> list[BlockStored]:
    return [e for e in decode.events.events if isinstance(e, BlockStored)]


def test_receive_reads_every_block_and_complete_releases_the_prefill(
    prefill: Prefill, decode_side: Decode
) -> None:
    tokens = tokens_of(6, tail=3)
    ready = prefill.serve("req-1", tokens)
    # The offer travels the signal wire as it is.
    wire = encode(ready, prefill.kvbm.compat_hash)
    assert (
        decode(wire, expected_compat=decode_side.kvbm.compat_hash, max_bytes=DEFAULT_MAX_BYTES)
        == ready
    )
    assert ready.num_tokens == len(tokens)
    assert (prefill.handoff.num_held, prefill.num_in_use) == (1, 6)
    hashes = decode_side.hashes(tokens)

    blocks = decode_side.handoff.receive(ready, hashes)

    assert blocks.sequence_hashes == hashes
    assert mismatched_blocks(decode_side.kvbm.storage(), blocks.block_ids, hashes) == []
    assert ready.first_token == fake_first_token(hashes)
    assert decode_side.num_in_use == 6
    assert len(decode_side.agent.reads) == 1
    assert prefill.handoff.complete(TransferDone("req-1", len(blocks)))
    assert (prefill.handoff.num_held, prefill.num_in_use) == (0, 0)
    assert prefill.kvbm.pool().stats().num_cached == 6  # released, still matchable
    decode_side.kvbm.release(blocks)
    assert decode_side.num_in_use == 0


def test_only_the_blocks_missing_locally_are_read(prefill: Prefill, decode_side: Decode) -> None:
    short, long = tokens_of(3), tokens_of(8)
    with decode_side.handoff.receive(prefill.serve("short", short), decode_side.hashes(short)):
        pass  # the decode now caches the first 3 blocks
    assert prefill.handoff.complete(TransferDone("short", 3))
    decode_side.agent.reads.clear()
    decode_side.events.events.clear()
    block_bytes = decode_side.kvbm.storage().layout.block_bytes
    hashes = decode_side.hashes(long)

    blocks = decode_side.handoff.receive(prefill.serve("long", long), hashes)

    assert decode_side.agent.bytes_read == 5 * block_bytes  # the 5-block suffix only
    assert len(decode_side.agent.reads) == 1
    assert blocks.sequence_hashes == hashes
    assert mismatched_blocks(decode_side.kvbm.storage(), blocks.block_ids, hashes) == []
    (stored,) = stored_events(decode_side)
    assert stored.sequence_hashes == tuple(hashes[3:])
    assert stored.parent_hash == hashes[2]  # chained to the local prefix
    decode_side.kvbm.release(blocks)

    decode_side.agent.reads.clear()
    with decode_side.handoff.receive(prefill.serve("again", long), hashes) as again:
        assert again.sequence_hashes == hashes
    assert decode_side.agent.reads == []  # everything was held already
    assert prefill.handoff.complete(TransferDone("long", 8))
    assert prefill.handoff.complete(TransferDone("again", 8))
    assert prefill.num_in_use == 0


def test_prefill_releases_on_complete_abort_expire_and_close(
    prefill: Prefill, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(3):
        prefill.serve(f"req-{i}", tokens_of(2, start=100 * i))
    assert (prefill.handoff.num_held, prefill.num_in_use) == (3, 6)
    with pytest.raises(InvalidInput, match="already has blocks on offer"):
        prefill.serve("req-0", tokens_of(2, start=500))
    assert prefill.num_in_use == 6  # the refused offer holds nothing

    assert prefill.handoff.complete(TransferDone("req-0", 2))
    assert prefill.handoff.abort("req-1")
    assert (prefill.handoff.num_held, prefill.num_in_use) == (1, 2)
    assert not prefill.handoff.complete(TransferDone("req-0", 2))  # known outcome: a value
    assert not prefill.handoff.abort("never-offered")

    assert prefill.handoff.expire(time.monotonic()) == []  # not stale yet
    with caplog.at_level(logging.WARNING, logger="fabric.worker.handoff"):
        assert prefill.handoff.expire(time.monotonic() + HOLD_S) == ["req-2"]
    assert (prefill.handoff.num_held, prefill.num_in_use) == (0, 0)
    assert any("req-2" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not prefill.handoff.complete(TransferDone("req-2", 2))  # a late decode

    prefill.serve("req-3", tokens_of(2, start=300))
    prefill.handoff.close()
    prefill.handoff.close()
    assert (prefill.handoff.num_held, prefill.num_in_use) == (0, 0)


def hold_local_prefix(prefill: Prefill, decode: Decode, tokens: list[int]) -> None:
    """Let the decode cache the prompt's first blocks, so a failure must return them too."""
    with decode.handoff.receive(prefill.serve("prefix", tokens), decode.hashes(tokens)):
        pass
    assert prefill.handoff.complete(TransferDone("prefix", len(decode.hashes(tokens))))


@pytest.mark.parametrize("fault", ["closed", "paused"])
def test_a_failed_read_returns_every_decode_block(
    prefill: Prefill, make_decode, loopback: LoopbackRegistry, fault: str
) -> None:
    decode_side = make_decode(timeout_s=0.05)
    tokens = tokens_of(6)
    hold_local_prefix(prefill, decode_side, tokens[: 2 * BS])
    ready = prefill.serve("req", tokens)
    if fault == "closed":
        prefill.agent.close()
        expected: type[Exception] = PeerUnavailable
    else:
        loopback.pause(prefill.agent.name)
        expected = TransferTimeout
    started = time.monotonic()

    with pytest.raises(expected):
        decode_side.handoff.receive(ready, decode_side.hashes(tokens))

    assert time.monotonic() - started < TIMEOUT_S
    assert decode_side.num_in_use == 0
    assert decode_side.kvbm.pool().stats().num_cached == 2  # the local prefix is still cached
    assert prefill.handoff.abort("req")


def test_a_full_decode_pool_refuses_without_leaking(prefill: Prefill, make_decode) -> None:
    decode_side = make_decode(num_blocks=4)
    pinned = decode_side.kvbm.allocate(2)
    assert pinned is not None
    tokens = tokens_of(3)
    ready = prefill.serve("req", tokens)

    with pytest.raises(DecodePoolFull, match="no room for 3 blocks"):
        decode_side.handoff.receive(ready, decode_side.hashes(tokens))

    assert decode_side.num_in_use == 2
    assert decode_side.agent.reads == []
    decode_side.kvbm.release(pinned)
    assert prefill.handoff.abort("req")


def test_an_incompatible_prefill_is_refused(make_prefill, decode_side: Decode) -> None:
    other = make_prefill(salt="another-model")
    tokens = tokens_of(3)
    ready = other.serve("req", tokens)

    with pytest.raises(ProtocolMismatch, match="compatibility hash"):
        decode_side.handoff.receive(ready, decode_side.hashes(tokens))

    assert decode_side.num_in_use == 0
    assert decode_side.agent.reads == []
    assert other.handoff.abort("req")


def test_a_hash_count_that_does_not_match_the_offer_is_refused(
    prefill: Prefill, decode_side: Decode
) -> None:
    tokens = tokens_of(4)
    ready = prefill.serve("req", tokens)
    with pytest.raises(InvalidInput, match="4 blocks offered for 3 sequence hashes"):
        decode_side.handoff.receive(ready, decode_side.hashes(tokens[: 3 * BS]))
    assert decode_side.num_in_use == 0
    assert prefill.handoff.abort("req")


def test_an_offer_naming_another_agent_is_refused(prefill: Prefill, decode_side: Decode) -> None:
    tokens = tokens_of(2)
    ready = prefill.serve("req", tokens)
    forged = BlocksReady(ready.request_id, ready.first_token, "someone-else", ready.block_set, 8)
    with pytest.raises(ProtocolMismatch, match="someone-else"):
        decode_side.handoff.receive(forged, decode_side.hashes(tokens))
    assert decode_side.num_in_use == 0
    assert prefill.handoff.abort("req")


def test_handoff_timeouts_must_be_positive(prefill: Prefill) -> None:
    with pytest.raises(InvalidInput):
        PrefillHandoff(prefill.kvbm, prefill.agent, hold_timeout_s=0)
    with pytest.raises(InvalidInput):
        DecodeHandoff(prefill.kvbm, prefill.agent, timeout_s=-1)
