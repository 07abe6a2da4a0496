"""A worker bound to every interface advertises one address peers can reach, in every endpoint
of its record (``fabric.discovery.addresses``); the endpoints answer there."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from fabric.config import load_config
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registry import Role
from fabric.errors import ConfigError
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.worker.runtime import build_worker

ADVERTISED = "127.0.0.2"  # loopback, but not the address servers bind by default


def test_wildcard_bind_advertises_the_given_host(
    tiny_dir: Path, registry: InMemoryRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")  # build_worker sets it only when unset
    config = load_config(
        model=str(tiny_dir),
        worker_id="addr-0",
        device_blocks=16,
        bind_host="0.0.0.0",
        advertise_host=ADVERTISED,
    )
    loopback = LoopbackRegistry()
    with build_worker(
        Role.AGGREGATED,
        config,
        registry=registry,
        make_agent=lambda name: LoopbackAgent(name, loopback),
    ) as worker:
        endpoints = worker.record.endpoints
        advertised = [
            endpoints.signal,
            endpoints.metrics,
            endpoints.events,
            endpoints.events_replay,
        ]
        assert all(e is not None and f"://{ADVERTISED}:" in e for e in advertised), advertised
        assert endpoints.metrics is not None
        with urllib.request.urlopen(endpoints.metrics, timeout=5) as response:
            assert b"fabric_worker_info" in response.read()


def test_loopback_bind_with_another_advertised_host_is_refused(
    tiny_dir: Path, registry: InMemoryRegistry
) -> None:
    config = load_config(model=str(tiny_dir), advertise_host="10.9.8.7")
    with pytest.raises(ConfigError, match="bind-host"):
        build_worker(Role.AGGREGATED, config, registry=registry)
