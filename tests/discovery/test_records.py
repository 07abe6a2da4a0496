"""Worker records: the typed parts, validation when built, the wire form (records written before
the parts were typed still parse, and are written the same way), malformed records refused."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.discovery.records import (
    Endpoints,
    EngineKind,
    FabricLayout,
    VllmLayout,
    WorkerRecord,
    layout_to_json,
)
from fabric.discovery.registry import Role
from fabric.errors import ConfigError, DiscoveryError

KEY = "/kv-fabric/workers/decode/decode-0"

# Literally what `fabric serve` (worker/runtime.py) and the vLLM connector
# (integrations/vllm/discovery.py) wrote while endpoints and layout were string-keyed dicts.
OLD_FABRIC_RECORD = b"""{"agent_name": "nixl-decode-0", "compat_hash": 11400714819323198485,
"endpoints": {"events": "tcp://127.0.0.1:41001", "events_replay": "",
"metrics": "http://127.0.0.1:41003/metrics", "signal": "tcp://127.0.0.1:41000"},
"layout": {"block_size": 16, "dtype": "float32", "inner_dim": 64, "kind": "layer_separate",
"model": "tiny", "model_path": "/models/tiny", "num_blocks": 512, "num_layers": 4,
"outer_dim": 2}, "role": "decode", "started_at": 1767225600.25, "version": 1,
"worker_id": "decode-0"}"""
OLD_VLLM_RECORD = b"""{"agent_name": "fabric-vllm-p0", "compat_hash": 42,
"endpoints": {"http": "http://127.0.0.1:8100", "signal": "tcp://127.0.0.1:5700"},
"layout": {"block_size": 128, "dtype": "float32", "engine": "vllm", "head_size": 64,
"head_size_v": 64, "kv_layout": "", "kv_role": "kv_producer", "model": "tiny",
"model_id": "/models/tiny", "num_kv_heads": 2, "num_layers": 4, "page_bytes": 65536,
"page_format": 1}, "role": "prefill", "started_at": 1767225601.5, "version": 1,
"worker_id": "p0"}"""


def test_a_record_of_an_older_fabric_worker_parses_and_is_written_the_same_way() -> None:
    record = WorkerRecord.from_bytes(OLD_FABRIC_RECORD, key=KEY)
    assert record == WorkerRecord(
        worker_id="decode-0",
        role=Role.DECODE,
        endpoints=Endpoints(
            signal="tcp://127.0.0.1:41000",
            metrics="http://127.0.0.1:41003/metrics",
            events="tcp://127.0.0.1:41001",
            events_replay=None,  # "" meant none
        ),
        agent_name="nixl-decode-0",
        layout=FabricLayout(
            model="tiny",
            model_path="/models/tiny",
            block_size=16,
            num_layers=4,
            outer_dim=2,
            inner_dim=64,
            dtype="float32",
            kind="layer_separate",
            num_blocks=512,
        ),
        compat_hash=11400714819323198485,
        started_at=1767225600.25,
    )
    assert record.layout.engine is EngineKind.FABRIC
    old = json.loads(OLD_FABRIC_RECORD)
    del old["endpoints"]["events_replay"]  # an absent address is left out, not written as ""
    assert json.loads(record.to_bytes()) == old


def test_a_record_of_an_older_vllm_instance_parses_and_is_written_the_same_way() -> None:
    record = WorkerRecord.from_bytes(OLD_VLLM_RECORD, key=KEY)
    assert record.endpoints == Endpoints(
        signal="tcp://127.0.0.1:5700", http="http://127.0.0.1:8100"
    )
    assert record.layout == VllmLayout(
        model="tiny",
        model_id="/models/tiny",
        kv_role="kv_producer",
        page_format=1,
        dtype="float32",
        num_layers=4,
        num_kv_heads=2,
        head_size=64,
        head_size_v=64,
        block_size=128,
        kv_layout="",
        page_bytes=65536,
    )
    assert record.layout.engine is EngineKind.VLLM
    assert json.loads(record.to_bytes()) == json.loads(OLD_VLLM_RECORD)


def test_round_trip_and_immutable_parts() -> None:
    record = WorkerRecord(
        "d-1", Role.DECODE, Endpoints(signal="tcp://127.0.0.1:1"), None, FabricLayout(), 7, 1.5
    )
    assert WorkerRecord.from_bytes(record.to_bytes(), key="k") == record
    assert json.loads(record.to_bytes())["version"] == 1
    assert json.loads(record.to_bytes())["layout"] == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.endpoints.signal = "changed"  # type: ignore[misc]


def _parts(cls: type, *, min_text: int = 0) -> st.SearchStrategy[typing.Any]:
    """Instances of a record part: every field None or a value of its declared type."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        kind = typing.get_args(hints[field.name])[0]
        value = st.integers(1, 2**63) if kind is int else st.text(min_size=min_text, max_size=12)
        values[field.name] = st.none() | value
    return st.builds(cls, **values)


@given(
    st.builds(
        WorkerRecord,
        worker_id=st.text(st.characters(blacklist_characters="/"), min_size=1, max_size=20),
        role=st.sampled_from(Role),
        endpoints=_parts(Endpoints, min_text=1),
        agent_name=st.none() | st.text(max_size=20),
        layout=_parts(FabricLayout) | _parts(VllmLayout),
        compat_hash=st.integers(0, 2**64 - 1),
        started_at=st.floats(0, 4e9),
        leaving=st.booleans(),
        draining=st.booleans(),
    )
)
def test_worker_record_round_trip_property(record: WorkerRecord) -> None:
    assert WorkerRecord.from_bytes(record.to_bytes(), key="k") == record


def test_leaving_is_written_only_when_true() -> None:
    record = WorkerRecord.from_bytes(OLD_FABRIC_RECORD, key=KEY)
    assert not record.leaving and "leaving" not in json.loads(record.to_bytes())
    leaving = dataclasses.replace(record, leaving=True)
    assert json.loads(leaving.to_bytes())["leaving"] is True
    assert WorkerRecord.from_bytes(leaving.to_bytes(), key=KEY) == leaving


def test_draining_is_written_only_when_true_and_older_records_lack_it() -> None:
    record = WorkerRecord.from_bytes(OLD_FABRIC_RECORD, key=KEY)
    assert not record.draining and "draining" not in json.loads(record.to_bytes())
    draining = dataclasses.replace(record, draining=True)
    assert json.loads(draining.to_bytes())["draining"] is True
    assert WorkerRecord.from_bytes(draining.to_bytes(), key=KEY) == draining


def test_a_vllm_layout_names_its_engine_on_the_wire() -> None:
    assert layout_to_json(VllmLayout(block_size=16)) == {"engine": "vllm", "block_size": 16}
    assert layout_to_json(FabricLayout(block_size=16)) == {"block_size": 16}


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: Endpoints(signal=""), "endpoint 'signal' is empty"),
        (lambda: Endpoints(http=5), "Endpoints.http is 5"),
        (lambda: FabricLayout(block_size=0), "block_size is 0"),
        (lambda: VllmLayout(page_bytes=-1), "page_bytes is -1"),
        (lambda: FabricLayout(block_size="16"), "block_size is '16'"),
        (lambda: FabricLayout(num_blocks=True), "num_blocks is True"),
        (lambda: VllmLayout(model=3), "model is 3"),
    ],
)
def test_invalid_parts_are_refused_when_built(build: typing.Any, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        build()


def test_keys_a_newer_writer_added_are_ignored() -> None:
    body = json.loads(OLD_FABRIC_RECORD)
    body["endpoints"]["grpc"] = "tcp://127.0.0.1:9"
    body["layout"]["future_fact"] = [1, 2]
    record = WorkerRecord.from_bytes(json.dumps(body).encode(), key=KEY)
    assert record == WorkerRecord.from_bytes(OLD_FABRIC_RECORD, key=KEY)


def _changed(**fields: typing.Any) -> bytes:
    """``OLD_FABRIC_RECORD`` with top-level ``fields`` replaced (``layout_*``: a layout field)."""
    body = json.loads(OLD_FABRIC_RECORD)
    for name, value in fields.items():
        if name.startswith("layout_"):
            body["layout"][name.removeprefix("layout_")] = value
        else:
            body[name] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff not json", "not JSON"),
        (b"[1, 2]", "version None"),
        (_changed(version=2), "version 2"),
        (json.dumps({"version": 1, "worker_id": "w"}).encode(), "malformed"),
        (_changed(role="router"), "malformed"),
        (_changed(compat_hash="12"), "malformed"),
        (_changed(compat_hash=-1), "malformed"),
        (_changed(worker_id="a/b"), "malformed"),
        (_changed(endpoints=["tcp://127.0.0.1:1"]), "malformed.*endpoints"),
        (_changed(endpoints={"signal": 5}), "malformed.*signal"),
        (_changed(layout=None), "malformed.*layout"),
        (_changed(layout_engine="sglang"), "malformed.*sglang"),
        (_changed(layout_block_size="16"), "malformed.*block_size"),
        (_changed(layout_block_size=0), "malformed.*block_size"),
        (_changed(layout_num_blocks=1.5), "malformed.*num_blocks"),
        (_changed(leaving=1), "malformed.*leaving"),
    ],
)
def test_malformed_record_raises_naming_the_key(payload: bytes, reason: str) -> None:
    with pytest.raises(DiscoveryError, match=f"'{KEY}'.*{reason}|{reason}.*'{KEY}'"):
        WorkerRecord.from_bytes(payload, key=KEY)
