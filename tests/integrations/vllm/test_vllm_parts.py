"""The connector's parts without an engine: config, page geometry, discovery, the hold table.

Marked slow with the rest of the vLLM suite (they import vLLM's connector base classes), but
each runs in milliseconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fabric.errors import ConfigError
from fabric.signal.errors import ErrorCode

pytestmark = pytest.mark.slow

vllm = pytest.importorskip("vllm", reason="run with .venv-vllm (launch/setup_vllm.sh)")

from fabric.discovery.records import EngineKind, VllmLayout  # noqa: E402
from fabric.discovery.registry import Role  # noqa: E402
from fabric.frontend.http_backend import uses_http  # noqa: E402
from fabric.integrations.vllm.config import ConnectorConfig, KvRole  # noqa: E402
from fabric.integrations.vllm.connector import open_store  # noqa: E402
from fabric.integrations.vllm.discovery import instance_record  # noqa: E402
from fabric.integrations.vllm.metadata import PeerHold, token_digest  # noqa: E402
from fabric.integrations.vllm.pages import PageGeometry  # noqa: E402
from fabric.integrations.vllm.producer import hold_table, prompt_check  # noqa: E402
from fabric.kvbm.shared.format import key_id  # noqa: E402
from fabric.pd import Refusal  # noqa: E402

GEOMETRY = PageGeometry(
    model="tiny",
    dtype="float32",
    num_layers=3,
    num_kv_heads=2,
    head_size=8,
    head_size_v=8,
    block_size=4,
    kv_layout="LBHNC",
    page_bytes=2 * 4 * 16 * 4,
)


def test_config_reads_extra_config_and_refuses_unknown_keys() -> None:
    config = ConnectorConfig.from_extra(
        {"disk_path": "/tmp/x", "etcd_endpoints": "http://127.0.0.1:2379", "hold_timeout_s": 5},
        kv_role="kv_producer",
        engine_id="e1",
    )
    assert config.kv_role is KvRole.PRODUCER and config.kv_role.produces
    assert config.disk_enabled and config.pd_enabled
    assert config.hold_timeout_s == 5.0
    assert config.fabric_worker_id == "vllm-e1"
    with pytest.raises(ConfigError, match="disk_pth"):
        ConnectorConfig.from_extra({"disk_pth": "/tmp/x"}, kv_role="kv_both", engine_id=None)
    with pytest.raises(ConfigError, match="save_blocks"):
        ConnectorConfig.from_extra({"save_blocks": "yes"}, kv_role="kv_both", engine_id=None)
    with pytest.raises(ConfigError, match="kv_role"):
        ConnectorConfig.from_extra({}, kv_role="kv_sideways", engine_id=None)


@pytest.mark.parametrize(
    ("kv_role", "signal", "http_url", "expected"),
    [
        ("kv_producer", "tcp://127.0.0.1:5", None, (Role.PREFILL, {"signal"})),
        ("kv_producer", "tcp://127.0.0.1:5", "http://h:1/", (Role.PREFILL, {"signal", "http"})),
        ("kv_both", "tcp://127.0.0.1:5", "http://h:1", (Role.AGGREGATED, {"signal", "http"})),
        ("kv_consumer", None, "http://h:1", (Role.DECODE, {"http"})),
        ("kv_consumer", None, None, None),
    ],
)
def test_instance_record_names_role_endpoints_and_served_model(
    kv_role: str, signal: str | None, http_url: str | None, expected: tuple | None
) -> None:
    extra = {"worker_id": "w-0", "served_model_name": "tiny"}
    if http_url is not None:
        extra["http_url"] = http_url
    config = ConnectorConfig.from_extra(extra, kv_role=kv_role, engine_id=None)
    record = instance_record(
        config, GEOMETRY, signal_endpoint=signal, agent_name="a", started_at=1.0
    )
    if expected is None:
        assert record is None  # nobody would read a consumer's record without http
        return
    assert record is not None
    assert (record.role, set(record.endpoints.to_json())) == expected
    if http_url is not None:
        assert record.endpoints.http == "http://h:1"
    assert isinstance(record.layout, VllmLayout)
    assert record.layout.engine is EngineKind.VLLM and uses_http(record)
    assert (record.layout.model, record.layout.model_id) == ("tiny", GEOMETRY.model)
    assert record.layout.block_size == GEOMETRY.block_size
    assert record.compat_hash == GEOMETRY.compat_hash
    with pytest.raises(ConfigError, match="http_url"):
        ConnectorConfig.from_extra({"http_url": "127.0.0.1:8100"}, kv_role=kv_role, engine_id=None)


def test_compat_hash_and_seed_change_with_every_layout_fact() -> None:
    base = (GEOMETRY.compat_hash, GEOMETRY.hash_seed)
    for name, value in [
        ("model", "other"),
        ("dtype", "bfloat16"),
        ("num_layers", 4),
        ("num_kv_heads", 4),
        ("head_size", 16),
        ("block_size", 8),
        ("kv_layout", "NHD"),
    ]:
        other = dataclasses.replace(GEOMETRY, **{name: value})
        assert other.compat_hash != base[0], name
        assert other.hash_seed != base[1], name


def test_a_hold_is_lent_only_to_a_consumer_presenting_its_prompt() -> None:
    table = hold_table(read_timeout_s=1.0)
    held = PeerHold("r1", (3, 4), 3, token_digest((5, 6, 7)), timeout_s=10.0)
    table.hold("r1", held, num_blocks=2, deadline=10.0)
    wrong = table.lend("r1", 1.0, prompt_check([5, 6, 8]))
    assert isinstance(wrong, Refusal) and wrong.code is ErrorCode.UNKNOWN_REQUEST
    shorter = table.lend("r1", 1.0, prompt_check([5, 6]))
    assert isinstance(shorter, Refusal) and "another prompt (3 tokens)" in shorter.message
    assert table.lend("r1", 9.5, prompt_check([5, 6, 7])) is held
    assert table.collect(11.0) == []  # lent at 9.5 s: kept for the read bound plus a second
    assert [f.request_id for f in table.collect(11.5)] == ["r1"]


def test_tier_events_reach_vllm_s_stream_and_decode_back_the_same() -> None:
    """Our events as vLLM's (``take_events``), encoded by vLLM's own encoder, decode back with
    the fabric's wire decoder (what the frontend and Dynamo-style routers read)."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    from fabric.integrations.vllm.connector import to_vllm_event
    from fabric.kvbm import BlockRemoved, BlockStored, SequenceHash, Tier, decode_event_batch

    hashes = tuple(SequenceHash(h) for h in (11, 22, 33))
    ours = [
        BlockStored(Tier.HOST, hashes, SequenceHash(7), None, None, 32),
        BlockRemoved(Tier.DISK, hashes[:1]),
    ]
    theirs = [to_vllm_event(e) for e in ours]
    assert theirs[0].medium == "CPU_PINNED" and theirs[1].medium == "DISK"
    payload = msgspec.msgpack.Encoder().encode(KVEventBatch(ts=1.0, events=theirs))
    decoded = decode_event_batch(payload).events
    assert decoded[0].tier is Tier.HOST and decoded[0].sequence_hashes == hashes
    assert decoded[0].parent_hash == 7 and decoded[0].block_size == 32
    assert decoded[1].tier is Tier.DISK and decoded[1].sequence_hashes == hashes[:1]


def test_a_g4_key_file_makes_the_connector_s_store_keyed(tmp_path: Path) -> None:
    """``shared_disk_key_file`` (a tier key; FABRIC_SHARED_DISK_KEY_FILE) reaches the G4 store
    the connector opens: its files carry a MAC, in the key's own directory."""
    key_file = tmp_path / "key"
    key_file.write_bytes(b"s" * 32)
    extra = {"disk_path": str(tmp_path / "g4"), "shared_disk_key_file": str(key_file)}
    config = ConnectorConfig.from_extra(extra, kv_role=None, engine_id=None)
    store = open_store(config, GEOMETRY)
    assert store is not None
    store.write(1, np.zeros(GEOMETRY.block_bytes, dtype=np.uint8))
    (directory,) = (tmp_path / "g4").iterdir()
    assert directory.name.endswith(f"-k{key_id(b's' * 32)}")
    out = np.empty(GEOMETRY.block_bytes, dtype=np.uint8)
    assert store.read_into(1, out)
    store.close()
