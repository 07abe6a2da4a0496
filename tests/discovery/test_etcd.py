"""etcd specifics: unreachable endpoints, endpoint parsing, worker keys (and a record's trip
through etcd), the EtcdServer helper (restart, wipe, CLI) and a watch that outlives an etcd
restart. The records themselves: ``test_records``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fabric.discovery.etcd import EtcdRegistry, parse_endpoints
from fabric.discovery.etcd_member import find_etcd_binary
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import (
    Role,
    WatchEvent,
    WatchEventKind,
    parse_worker_key,
    worker_key,
    workers_prefix,
)
from fabric.errors import ConfigError, DiscoveryError

REPO_ROOT = Path(__file__).resolve().parents[2]
CLOSED_PORT_ENDPOINT = "http://127.0.0.1:1"  # port 1 (tcpmux) is closed on these hosts


def make_record(worker_id: str = "prefill-0", role: Role = Role.PREFILL) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role=role,
        endpoints=Endpoints(signal="tcp://127.0.0.1:5555", http="http://127.0.0.1:8000"),
        agent_name=f"agent-{worker_id}",
        layout=FabricLayout(model="tiny-llama", dtype="float32", block_size=16, num_layers=4),
        compat_hash=2**64 - 1,
        started_at=1_700_000_000.25,
    )


# -- unreachable etcd ----------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["get", "put", "grant_lease", "watch_prefix"])
def test_unreachable_endpoint_raises_within_the_timeout(verb: str) -> None:
    registry = EtcdRegistry(CLOSED_PORT_ENDPOINT, timeout_s=0.5)
    calls = {
        "get": lambda: registry.get("/k"),
        "put": lambda: registry.put("/k", b"v"),
        "grant_lease": lambda: registry.grant_lease(5),
        "watch_prefix": lambda: registry.watch_prefix("/k", lambda event: None),
    }
    started = time.monotonic()
    try:
        with pytest.raises(DiscoveryError, match=r"127\.0\.0\.1:1.*etcd is running"):
            calls[verb]()
        assert time.monotonic() - started < 0.5 + 1.5
    finally:
        registry.close()


def test_parse_endpoints() -> None:
    assert parse_endpoints("http://127.0.0.1:2379") == (False, [("127.0.0.1", 2379)])
    assert parse_endpoints("10.0.0.1:1, http://h2:2") == (False, [("10.0.0.1", 1), ("h2", 2)])
    assert parse_endpoints(["localhost"]) == (False, [("localhost", 2379)])
    assert parse_endpoints("https://h:1,https://h2:2") == (True, [("h", 1), ("h2", 2)])
    with pytest.raises(ConfigError, match="mix"):
        parse_endpoints("https://h:1,h2:2")
    with pytest.raises(ConfigError, match="not http"):
        parse_endpoints("grpc://127.0.0.1:2379")
    with pytest.raises(ConfigError, match="no etcd endpoints"):
        parse_endpoints([])


# -- worker keys -------------------------------------------------------------------------------


def test_key_scheme() -> None:
    record = make_record("w-7", Role.DECODE)
    assert record.key() == "/kv-fabric/workers/decode/w-7"
    assert record.key("prod") == worker_key("prod", Role.DECODE, "w-7")
    assert workers_prefix() == "/kv-fabric/workers/"
    assert workers_prefix("ns", Role.PREFILL) == "/ns/workers/prefill/"
    assert parse_worker_key("/kv-fabric/workers/decode/w-7") == (Role.DECODE, "w-7")
    for foreign in ["/kv-fabric/workers/decode/", "/kv-fabric/workers/router/x", "/other/x"]:
        assert parse_worker_key(foreign) is None
    with pytest.raises(ConfigError, match="worker_id"):
        make_record("a/b")


@pytest.mark.etcd
def test_record_survives_a_trip_through_etcd(etcd_server: EtcdServer, namespace: str) -> None:
    registry = EtcdRegistry(etcd_server.endpoint, timeout_s=2)
    try:
        record = make_record()
        registry.put(record.key(namespace), record.to_bytes())
        stored = registry.get(record.key(namespace))
        assert stored is not None
        assert WorkerRecord.from_bytes(stored, key=record.key(namespace)) == record
    finally:
        registry.close()


# -- the EtcdServer helper ---------------------------------------------------------------------


def test_binary_override_must_be_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_ETCD_BIN", "/nonexistent/etcd")
    with pytest.raises(ConfigError, match="FABRIC_ETCD_BIN"):
        find_etcd_binary()


@pytest.mark.etcd
def test_restart_keeps_data_and_wipe_drops_it(fresh_etcd: EtcdServer) -> None:
    registry = EtcdRegistry(fresh_etcd.endpoint, timeout_s=2)
    try:
        registry.put("/k", b"v")
        endpoint = fresh_etcd.endpoint
        fresh_etcd.restart()
        assert fresh_etcd.endpoint == endpoint
        assert registry.get("/k") == b"v"
        fresh_etcd.restart(wipe=True)
        assert registry.get("/k") is None
    finally:
        registry.close()
    fresh_etcd.stop()
    assert not fresh_etcd.running


@pytest.mark.etcd
def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("a file where etcd wants a directory")
    server = EtcdServer(data_dir=data_dir, startup_timeout_s=5)
    try:
        with pytest.raises(DiscoveryError, match="last lines of"):
            server.start()
        assert not server.running
    finally:
        server.close()
    assert data_dir.exists()  # a given data dir is never removed


def test_cli_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fabric.discovery.etcd_server", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
    )
    assert "--client-port" in result.stdout


@pytest.mark.etcd
def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.discovery.etcd_server", "--client-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(20)
        assert lines and lines[0].startswith("http://127.0.0.1:"), lines
        registry = EtcdRegistry(lines[0].strip(), timeout_s=2)
        try:
            registry.put("/cli", b"ok")
            assert registry.get("/cli") == b"ok"
        finally:
            registry.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


# -- a watch outlives an etcd restart -------------------------------------------------------------


@pytest.mark.etcd
def test_watch_re_lists_after_a_wiped_restart(
    fresh_etcd: EtcdServer, caplog: pytest.LogCaptureFixture, wait_until
) -> None:
    caplog.set_level(logging.INFO, logger="fabric.discovery")
    writer = EtcdRegistry(fresh_etcd.endpoint, timeout_s=2)
    reader = EtcdRegistry(fresh_etcd.endpoint, timeout_s=2)
    events: list[WatchEvent] = []
    try:
        writer.put("/w/gone", b"1")
        watch = reader.watch_prefix("/w/", events.append, include_existing=True)
        fresh_etcd.stop()
        assert wait_until(lambda: not watch.connected, 5)
        fresh_etcd.restart(wipe=True)
        writer.put("/w/new", b"2")
        assert wait_until(lambda: len(events) >= 3 and watch.connected, 10)
        writer.put("/w/later", b"3")  # the new stream is on the new etcd's revisions
        assert wait_until(lambda: len(events) >= 4, 5)
        assert [(e.kind, e.key) for e in events] == [
            (WatchEventKind.PUT, "/w/gone"),
            (WatchEventKind.DELETE, "/w/gone"),
            (WatchEventKind.PUT, "/w/new"),
            (WatchEventKind.PUT, "/w/later"),
        ]
        messages = [(r.levelno, r.getMessage()) for r in caplog.records]
        assert any(lvl == logging.WARNING and "watch on '/w/' lost" in m for lvl, m in messages)
        assert any(lvl == logging.INFO and "re-established" in m for lvl, m in messages)
    finally:
        reader.close()
        writer.close()
