"""Remote block sets: wire round trip, refusals, and planned reads between layouts (loopback agent).

Bytes are checked through ``block_view`` (every (layer, outer) chunk of a block), never through
the planner or ``copy_blocks``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from fabric.errors import InvalidInput, LayoutMismatch, ProtocolMismatch
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.remote import (
    REMOTE_BLOCK_SET_VERSION,
    RemoteBlockSet,
    export_block_set,
    plan_read,
)
from fabric.kvbm.tiers.storage import DiskStorage, TensorStorage, host_storage
from fabric.transfer import LoopbackAgent, LoopbackRegistry

FC, LS = LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE
COMPAT = 0x1234_5678_9ABC_DEF0


def layout(kind: LayoutKind, num_blocks: int = 16, alignment: int = 1, **geometry) -> LayoutSpec:
    facts = {"num_layers": 3, "outer_dim": 2, "block_size": 4, "inner_dim": 8}
    facts |= geometry
    dtype = facts.pop("dtype", torch.float16)
    return LayoutSpec(kind, num_blocks, dtype=dtype, alignment=alignment, **facts)


def filled(spec: LayoutSpec, seed: int) -> TensorStorage:
    storage = host_storage(spec)
    rng = np.random.default_rng(seed)
    for t in storage.tensors:
        raw = t.view(torch.uint8).numpy().reshape(-1)
        raw[:] = rng.integers(0, 256, raw.size, dtype=np.uint8)
    return storage


def block_bytes(storage: TensorStorage, block: int) -> bytes:
    spec = storage.layout
    return b"".join(
        storage.block_view(block, layer, outer).view(torch.uint8).numpy().tobytes()
        for layer in range(spec.num_layers)
        for outer in range(spec.outer_dim)
    )


@pytest.fixture
def agents() -> Iterator[tuple[LoopbackAgent, LoopbackAgent]]:
    registry = LoopbackRegistry()
    prefill, decode = LoopbackAgent("prefill", registry), LoopbackAgent("decode", registry)
    yield prefill, decode
    decode.close()
    prefill.close()


def exported(
    spec: LayoutSpec, ids: list[int], agent: LoopbackAgent
) -> tuple[TensorStorage, RemoteBlockSet]:
    storage = filled(spec, seed=11)
    agent.register(storage.buffers())
    return storage, export_block_set(storage, ids, agent, COMPAT)


# -- wire format ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [layout(FC), layout(LS, alignment=256), layout(FC, outer_dim=1, dtype=torch.bfloat16)],
    ids=["fc", "ls-padded", "fc-joined"],
)
def test_round_trip(agents, spec: LayoutSpec) -> None:
    prefill, _ = agents
    _, block_set = exported(spec, [3, 1, 15], prefill)
    assert block_set.version == REMOTE_BLOCK_SET_VERSION
    assert block_set.agent_name == "prefill"
    assert len(block_set.buffers) == spec.num_buffers
    decoded = RemoteBlockSet.from_bytes(block_set.to_bytes())
    assert decoded == block_set
    assert decoded.block_ids == (3, 1, 15)


def _wire(block_set: RemoteBlockSet) -> dict:
    return msgpack.unpackb(block_set.to_bytes())


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda m: m.update(version=2), ProtocolMismatch, "version 2"),
        (lambda m: m.pop("agent_name"), InvalidInput, "malformed"),
        (lambda m: m.update(block_ids=b"\x01\x02\x03"), InvalidInput, "int64"),
        (
            lambda m: m.update(block_ids=np.array([99], "<i8").tobytes()),
            InvalidInput,
            "out of range",
        ),
        (lambda m: m["layout"].update(block_stride=7), ProtocolMismatch, "block stride"),
        (lambda m: m["layout"].update(dtype="complex64"), LayoutMismatch, "complex64"),
        (lambda m: m["layout"].update(kind="striped"), InvalidInput, "malformed"),
        (lambda m: m.update(buffers=[]), LayoutMismatch, "0 buffers"),
        (lambda m: m["buffers"][0].__setitem__(2, "FILE"), InvalidInput, "DRAM or VRAM"),
        (lambda m: m["buffers"][0].__setitem__(1, 10), LayoutMismatch, "holds 10 bytes"),
        (lambda m: m.update(compat_hash=-1), InvalidInput, "uint64"),
    ],
)
def test_malformed_wire_is_refused(agents, mutate, error, needle) -> None:
    _, block_set = exported(layout(FC), [1, 2], agents[0])
    msg = _wire(block_set)
    mutate(msg)
    with pytest.raises(error, match=needle):
        RemoteBlockSet.from_bytes(msgpack.packb(msg))


@pytest.mark.parametrize("data", [b"\xc1garbage", msgpack.packb([1, 2]), "text"])
def test_not_a_block_set(data) -> None:
    with pytest.raises(InvalidInput):
        RemoteBlockSet.from_bytes(data)


def test_export_refuses_disk_storage(agents, tmp_path: Path) -> None:
    disk = DiskStorage(layout(FC), tmp_path)
    try:
        with pytest.raises(InvalidInput, match="disk"):
            export_block_set(disk, [0], agents[0], COMPAT)
    finally:
        disk.close()


# -- refusals when planning ---------------------------------------------------------------------


def test_compat_hash_is_checked_first(agents) -> None:
    _, block_set = exported(layout(FC), [1, 2], agents[0])
    other_geometry = host_storage(layout(LS, block_size=8))
    with pytest.raises(ProtocolMismatch) as info:
        plan_read(other_geometry, [0, 1], block_set, compat_hash=0xBEEF)
    assert "0x123456789abcdef0" in str(info.value) and "0x000000000000beef" in str(info.value)


@pytest.mark.parametrize(
    ("geometry", "fields"),
    [
        ({"block_size": 8}, ["block_size"]),
        ({"num_layers": 2, "inner_dim": 16}, ["num_layers", "inner_dim"]),
        ({"dtype": torch.bfloat16}, ["dtype"]),
        ({"outer_dim": 1, "inner_dim": 16}, ["outer_dim", "inner_dim"]),
    ],
)
def test_geometry_mismatch_names_the_fields(agents, geometry, fields) -> None:
    _, block_set = exported(layout(FC), [1, 2], agents[0])
    local = host_storage(layout(LS, **geometry))
    with pytest.raises(LayoutMismatch) as info:
        plan_read(local, [0, 1], block_set, compat_hash=COMPAT)
    for field in fields:
        assert field in str(info.value)


def test_bad_ids_are_refused(agents, tmp_path: Path) -> None:
    _, block_set = exported(layout(FC), [1, 2], agents[0])
    local = host_storage(layout(LS))
    with pytest.raises(InvalidInput, match="pair up"):
        plan_read(local, [0], block_set, compat_hash=COMPAT)
    with pytest.raises(InvalidInput, match="twice"):
        plan_read(local, [4, 4], block_set, compat_hash=COMPAT)
    with pytest.raises(InvalidInput, match="out of range"):
        plan_read(local, [0, 16], block_set, compat_hash=COMPAT)
    disk = DiskStorage(layout(FC), tmp_path)
    try:
        with pytest.raises(InvalidInput, match="disk"):
            plan_read(disk, [0, 1], block_set, compat_hash=COMPAT)
    finally:
        disk.close()


# -- reads between layouts, byte for byte ---------------------------------------------------------

PAIRINGS = {
    "fc->ls": (layout(FC), layout(LS, num_blocks=20)),
    "ls->fc": (layout(LS), layout(FC, num_blocks=20)),
    "fc-padded->fc": (layout(FC, alignment=512), layout(FC, num_blocks=20)),
    "ls->ls-padded": (layout(LS), layout(LS, num_blocks=20, alignment=256)),
    "fc-joined->ls-joined-padded": (
        layout(FC, outer_dim=1, inner_dim=16),
        layout(LS, num_blocks=20, outer_dim=1, inner_dim=16, alignment=128),
    ),
}
ID_PATTERNS = {
    "run": ([2, 3, 4, 5], [10, 11, 12, 13]),
    "permuted": ([15, 0, 7, 3, 9], [1, 19, 2, 5, 4]),
}


@pytest.mark.parametrize("pattern", ID_PATTERNS)
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_read_between_layouts_is_byte_exact(agents, pairing: str, pattern: str) -> None:
    prefill, decode = agents
    remote_spec, local_spec = PAIRINGS[pairing]
    remote_ids, local_ids = ID_PATTERNS[pattern]
    source, block_set = exported(remote_spec, remote_ids, prefill)
    local = host_storage(local_spec)
    for t in local.tensors:
        t.view(torch.uint8).fill_(0xEE)
    decode.register(local.buffers())
    wire = RemoteBlockSet.from_bytes(block_set.to_bytes())
    local_regions, remote_regions = plan_read(local, local_ids, wire, compat_hash=COMPAT)
    peer = decode.add_peer(wire.agent_metadata)
    decode.wait(decode.read(local_regions, remote_regions, peer, notify=b"read"), 5)
    for src, dst in zip(remote_ids, local_ids, strict=True):
        assert block_bytes(local, dst) == block_bytes(source, src)
    untouched = set(range(local_spec.num_blocks)) - set(local_ids)
    for block in untouched:
        assert block_bytes(local, block) == b"\xee" * local_spec.block_bytes
    assert prefill.notifications() == [("decode", b"read")]
    assert decode.num_live_transfers == 0


COALESCING = {
    "fc-run": (layout(FC), layout(FC), [2, 3, 4, 5], [8, 9, 10, 11], 1),
    "fc-padded-local": (layout(FC), layout(FC, alignment=512), [2, 3, 4, 5], [8, 9, 10, 11], 4),
    "fc-local-gap": (layout(FC), layout(FC), [2, 3, 4, 5], [8, 9, 11, 12], 2),
    "ls-run": (layout(LS), layout(LS), [2, 3, 4, 5], [8, 9, 10, 11], 3),  # one per layer
    "ls-descending": (layout(LS), layout(LS), [5, 4, 3, 2], [8, 9, 10, 11], 12),
    "fc-ls": (layout(FC), layout(LS), [2, 3, 4, 5], [8, 9, 10, 11], 12),  # per (block, layer)
    "ls-fc": (layout(LS), layout(FC), [0, 1], [0, 1], 6),
}


@pytest.mark.parametrize("case", COALESCING)
def test_coalescing_counts(agents, case: str) -> None:
    remote_spec, local_spec, remote_ids, local_ids, expected = COALESCING[case]
    _, block_set = exported(remote_spec, remote_ids, agents[0])
    local = host_storage(local_spec)
    local_regions, remote_regions = plan_read(local, local_ids, block_set, compat_hash=COMPAT)
    assert len(local_regions) == len(remote_regions) == expected
    assert local_regions.nbytes == len(local_ids) * local_spec.block_bytes


# -- reads of a layer subset (layer-wise P/D) ----------------------------------------------------

LAYER_PAIRINGS = {
    "fc->fc": (layout(FC), layout(FC, num_blocks=20)),
    "ls->ls-padded": (layout(LS), layout(LS, num_blocks=20, alignment=256)),
    "fc->ls": (layout(FC), layout(LS, num_blocks=20)),
    "ls-padded->fc": (layout(LS, alignment=256), layout(FC, num_blocks=20)),
}


def layer_bytes(storage: TensorStorage, block: int, layer: int) -> bytes:
    return b"".join(
        storage.block_view(block, layer, outer).view(torch.uint8).numpy().tobytes()
        for outer in range(storage.layout.outer_dim)
    )


@pytest.mark.parametrize("layers", [(0, 1), (1, 3), (2, 3)], ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("pairing", LAYER_PAIRINGS)
def test_layer_subset_read_copies_only_those_layers(agents, pairing: str, layers) -> None:
    prefill, decode = agents
    remote_spec, local_spec = LAYER_PAIRINGS[pairing]
    remote_ids, local_ids = [2, 3, 4, 5], [10, 11, 12, 13]
    source, block_set = exported(remote_spec, remote_ids, prefill)
    local = host_storage(local_spec)
    for t in local.tensors:
        t.view(torch.uint8).fill_(0xEE)
    decode.register(local.buffers())
    plan = plan_read(local, local_ids, block_set, compat_hash=COMPAT, layers=layers)
    decode.wait(decode.read(*plan, decode.add_peer(block_set.agent_metadata)), 5)
    untouched = b"\xee" * len(layer_bytes(local, 0, 0))
    for src, dst in zip(remote_ids, local_ids, strict=True):
        for layer in range(local_spec.num_layers):
            want = layer_bytes(source, src, layer) if layers[0] <= layer < layers[1] else untouched
            assert layer_bytes(local, dst, layer) == want, (src, layer)
    assert plan[0].nbytes == len(local_ids) * (layers[1] - layers[0]) * len(untouched)


@pytest.mark.parametrize(
    ("kind", "layers", "expected"),
    [
        (FC, (0, 3), 1),  # every layer: whole slots, one run
        (FC, (1, 2), 4),  # one layer of [layer][outer] slots: one region per block
        (LS, (1, 3), 2),  # layer-separate: one run per layer buffer
    ],
)
def test_layer_subset_coalescing(agents, kind: LayoutKind, layers, expected: int) -> None:
    _, block_set = exported(layout(kind), [2, 3, 4, 5], agents[0])
    local = host_storage(layout(kind))
    plan = plan_read(local, [8, 9, 10, 11], block_set, compat_hash=COMPAT, layers=layers)
    assert len(plan[0]) == len(plan[1]) == expected


@pytest.mark.parametrize("layers", [(0, 0), (2, 1), (-1, 2), (0, 4)])
def test_bad_layer_range_is_refused(agents, layers) -> None:
    _, block_set = exported(layout(FC), [2, 3], agents[0])
    with pytest.raises(InvalidInput, match="layers"):
        plan_read(host_storage(layout(FC)), [0, 1], block_set, compat_hash=COMPAT, layers=layers)
